"""First-order analysis: flat gradients and their cosines (paper Sec. 3.1, Figs. 1, 3a, 5b).

A loss is given as a zero-argument callable returning a scalar built from the parameters, so the
caller decides the batch and the loss term (CE, KL, ...) and nothing here touches the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from zsq.errors import ZsqError

LossFn = Callable[[], Tensor]
Vector = Tensor | Sequence[Tensor]


def flatten(tensors: Vector) -> Tensor:
    """One 1-D tensor from a flat vector or a list of tensors (concatenated in order)."""
    if isinstance(tensors, Tensor):
        return tensors.reshape(-1)
    tensors = list(tensors)
    if not tensors:
        raise ZsqError("got an empty list of tensors; pass at least one parameter or vector")
    return torch.cat([t.reshape(-1) for t in tensors])


def check_params(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters as a list, checked to be non-empty, trainable, of one dtype and device."""
    params = list(params)
    if not params:
        raise ZsqError("no parameters given; pass e.g. [p for p in model.parameters()]")
    if not all(p.requires_grad for p in params):
        raise ZsqError("every parameter must have requires_grad=True; drop frozen ones from params")
    if len({(p.dtype, p.device) for p in params}) > 1:
        raise ZsqError("parameters differ in dtype or device; move the model to one dtype/device")
    return params


def evaluate_loss(loss_fn: LossFn) -> Tensor:
    """Call ``loss_fn`` and check it gave a differentiable scalar."""
    loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ZsqError("loss_fn must return a scalar tensor; reduce the loss with .mean()/.sum()")
    if not loss.requires_grad:
        raise ZsqError(
            "the loss does not depend on the parameters; build it from them inside loss_fn, "
            "outside torch.no_grad()"
        )
    return loss.reshape(())


def grads_or_zeros(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """Replace the ``None`` autograd gives for an unused parameter by zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def flat_grad(loss_fn: LossFn, params: Sequence[Tensor], *, retain_graph: bool = False) -> Tensor:
    """Gradient of ``loss_fn()`` with respect to ``params``, concatenated into one 1-D tensor.

    Parameters the loss does not use get zero gradient. ``.grad`` fields are left untouched.
    """
    params = check_params(params)
    loss = evaluate_loss(loss_fn)
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return flatten(grads_or_zeros(grads, params)).detach()


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """Dot product of two flat vectors, accumulated in float64 (a 0-dim float64 tensor)."""
    return torch.sum(a * b, dtype=torch.float64)


def cosine_similarity(a: Vector, b: Vector) -> float:
    """Cosine of the angle between two vectors (flat tensors or lists of tensors), in float64.

    Returns NaN when either vector is zero (the angle is undefined there).
    """
    a64, b64 = flatten(a).double(), flatten(b).double()
    if a64.numel() != b64.numel():
        raise ZsqError(
            f"vectors differ in length ({a64.numel()} vs {b64.numel()}); take both gradients "
            "with respect to the same parameters"
        )
    norms = float(torch.linalg.vector_norm(a64)) * float(torch.linalg.vector_norm(b64))
    if norms == 0.0:
        return math.nan
    return float(torch.dot(a64, b64)) / norms


def grad_cosine(loss_a: LossFn, loss_b: LossFn, params: Sequence[Tensor]) -> float:
    """Cosine similarity between the gradients of two loss terms (e.g. CE and KL, Fig. 1)."""
    return cosine_similarity(flat_grad(loss_a, params), flat_grad(loss_b, params))


class GradientMeter:
    """Epoch-mean gradient and the cosine between consecutive epoch means (Fig. 3a).

    Call ``update`` with each step's gradient and ``end_epoch`` once per epoch; the running sum is
    kept in float64 on the gradient's device.
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._steps = 0
        self.previous_mean: Tensor | None = None
        self.cosines: list[float] = []

    def update(self, grad: Vector) -> None:
        flat = flatten(grad).detach().double()
        if self._sum is None:
            self._sum = flat.clone()
        elif flat.numel() != self._sum.numel():
            raise ZsqError("gradient length changed between steps; track the same parameters")
        else:
            self._sum += flat
        self._steps += 1

    def end_epoch(self) -> float | None:
        """Close the epoch: returns the cosine with the previous epoch's mean (None the first
        time) and appends it to ``cosines``."""
        if self._sum is None:
            raise ZsqError("no gradient recorded this epoch; call update() before end_epoch()")
        mean = self._sum / self._steps
        cosine = None
        if self.previous_mean is not None:
            cosine = cosine_similarity(self.previous_mean, mean)
            self.cosines.append(cosine)
        self.previous_mean = mean
        self._sum, self._steps = None, 0
        return cosine
