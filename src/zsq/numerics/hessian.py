"""Second-order analysis of a loss at fixed parameters (paper Sec. 3.2, Fig. 2).

Hessian-vector products by double backward, the Hessian trace by Hutchinson's estimator, the top
eigenpairs by power iteration with deflation, the eigenvalue density by stochastic Lanczos
quadrature (Ghorbani et al. 2019, as in PyHessian) and the 1-D loss surface along a direction.

Every function takes ``loss_fn``, a zero-argument callable returning a scalar loss built from
``params``; it is called once per function call and the gradient graph is reused for every
product (``HessianOperator``), so all products see the same batch and the same random masks. For
a fake-quantized student the straight-through estimator makes this the Hessian with respect to
the dequantized weights. Vectors live in the parameters' dtype and device; dot products, norms
and traces are accumulated in float64. Random vectors come from a ``torch.Generator`` on the
parameters' device seeded by ``seed``: results repeat per device, and the global RNG is untouched.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.numerics.gradients import (
    LossFn,
    Vector,
    check_params,
    dot64,
    evaluate_loss,
    flatten,
    grads_or_zeros,
)

log = logging.getLogger(__name__)

BREAKDOWN_EPS = 100.0
"""Lanczos restarts when a new residual is below this many machine epsilons of the spectrum's
scale: the Krylov space is (numerically) invariant, and a fresh vector explores the rest."""
RESTART_TRIES = 5
RESTART_MIN_FRACTION = 1e-2


class HessianOperator:
    """Products ``H @ v`` for flat vectors ``v``, H the Hessian of ``loss_fn()`` at ``params``.

    ``loss_fn`` is called once and its gradient kept with ``create_graph=True``; each product is
    one more backward pass through that graph (``d(g . v)/d params``). The graph stays in memory
    as long as this object does.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[Tensor]) -> None:
        self.params = check_params(params)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        loss = evaluate_loss(loss_fn)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A gradient that does not require grad is constant: its rows of H are zero.
        self._live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def __call__(self, vector: Tensor) -> Tensor:
        if not self._live:
            return torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        chunks = unflatten(vector, self.params)
        products = torch.autograd.grad(
            [g for _, g in self._live],
            self.params,
            grad_outputs=[chunks[i] for i, _ in self._live],
            retain_graph=True,
            allow_unused=True,
        )
        return flatten(grads_or_zeros(products, self.params)).detach()

    def flat(self, vector: Vector) -> Tensor:
        """``vector`` (flat, or a list shaped like the parameters) as a flat detached tensor."""
        return to_flat(vector, self.params)


def to_flat(vector: Vector, params: Sequence[Tensor]) -> Tensor:
    """``vector`` as one detached 1-D tensor in the parameters' dtype and device."""
    if isinstance(vector, Tensor):
        if vector.numel() != sum(p.numel() for p in params):
            raise ZsqError(
                f"vector has {vector.numel()} entries but the parameters have "
                f"{sum(p.numel() for p in params)}; pass one entry per parameter element"
            )
        flat = vector.reshape(-1)
    else:
        vector = list(vector)
        shapes = [tuple(t.shape) for t in vector]
        if shapes != [tuple(p.shape) for p in params]:
            raise ZsqError("vector tensors must match the parameters one to one in shape")
        flat = flatten(vector)
    return flat.detach().to(dtype=params[0].dtype, device=params[0].device)


def unflatten(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``params``."""
    sizes = [p.numel() for p in params]
    return [c.view_as(p) for c, p in zip(torch.split(flat, sizes), params, strict=True)]


def hvp(loss_fn: LossFn, params: Sequence[Tensor], vector: Vector) -> list[Tensor]:
    """Hessian-vector product ``H @ vector`` by double backward, shaped like ``params``."""
    op = HessianOperator(loss_fn, params)
    return unflatten(op(op.flat(vector)), op.params)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rademacher(op: HessianOperator, gen: torch.Generator) -> Tensor:
    z = torch.randint(0, 2, (op.dim,), generator=gen, device=op.device, dtype=op.dtype)
    return z.mul_(2).sub_(1)


def _norm(x: Tensor) -> float:
    return math.sqrt(float(dot64(x, x)))


def _progress(iterable: Iterable, progress: bool, desc: str) -> Iterable:
    return tqdm(iterable, desc=desc, disable=not progress, leave=False)


# --- trace -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of tr(H): the probe mean, its standard error (NaN for one probe) and
    the number of probes that ran."""

    mean: float
    std_error: float
    probes: int

    @classmethod
    def from_values(cls, values: Sequence[float]) -> TraceEstimate:
        v = torch.tensor(values, dtype=torch.float64)
        std_error = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
        return cls(float(v.mean()), std_error, len(v))


def hutchinson_trace(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    probes: int = 100,
    seed: int = 0,
    progress: bool = False,
    time_limit_s: float | None = None,
) -> TraceEstimate:
    """tr(H) ~ mean of ``z . H z`` over Rademacher probes ``z`` (each an unbiased estimate).

    With ``time_limit_s`` the loop stops after the probe that crosses the limit (at least one
    probe always runs); ``probes`` in the result says how many ran.
    """
    if probes < 1:
        raise ZsqError(f"probes={probes}; use at least 1 (100 or more for a tight estimate)")
    op = HessianOperator(loss_fn, params)
    gen = _generator(op.device, seed)
    values: list[float] = []
    start = time.monotonic()
    for _ in _progress(range(probes), progress, "Hutchinson trace"):
        z = _rademacher(op, gen)
        values.append(float(dot64(z, op(z))))
        if time_limit_s is not None and time.monotonic() - start >= time_limit_s:
            break
    if len(values) < probes:
        log.info(
            "Hutchinson trace: time limit %.1f s reached after %d probes", time_limit_s, len(values)
        )
    return TraceEstimate.from_values(values)


# --- top eigenpairs --------------------------------------------------------------------------


def _project_out(x: Tensor, basis: Sequence[Tensor]) -> Tensor:
    """``x`` minus its components along the orthonormal ``basis`` (two Gram-Schmidt passes, since
    one pass loses orthogonality when ``x`` lies nearly in the span)."""
    for _ in range(2 if basis else 0):
        for q in basis:
            x = x - float(dot64(x, q)) * q
    return x


def top_eigenpairs(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = 1,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[float], list[list[Tensor]]]:
    """The ``k`` eigenvalues of H largest in magnitude (signed), with unit eigenvectors.

    PyHessian's method: power iteration from a random normal vector, each new pair found in the
    orthogonal complement of the earlier eigenvectors (deflation by projection), so they come out
    ordered by decreasing ``|lambda|``. A pair is done when the Rayleigh quotient changes by less
    than ``tol`` relative to its size, or after ``iters`` products (a warning says so). The
    eigenvector's sign is arbitrary; power iteration converges slowly when the two largest
    ``|lambda|`` are close.
    """
    op = HessianOperator(loss_fn, params)
    if not 1 <= k <= op.dim:
        raise ZsqError(f"k={k} eigenpairs asked of a {op.dim}-dimensional Hessian; use 1..{op.dim}")
    if iters < 1:
        raise ZsqError(f"iters={iters}; use at least 1 power iteration")
    gen = _generator(op.device, seed)
    values: list[float] = []
    vectors: list[Tensor] = []
    for index in range(k):
        start = torch.randn(op.dim, generator=gen, device=op.device, dtype=op.dtype)
        value, vector = _power_iteration(op, start, vectors, iters, tol, progress, index)
        values.append(value)
        vectors.append(vector)
    return values, [[t.clone() for t in unflatten(v, op.params)] for v in vectors]


def _power_iteration(
    op: HessianOperator,
    start: Tensor,
    found: Sequence[Tensor],
    iters: int,
    tol: float,
    progress: bool,
    index: int,
) -> tuple[float, Tensor]:
    v = _project_out(start, found)
    v = v / _norm(v)
    value: float | None = None
    for _ in _progress(range(iters), progress, f"eigenpair {index + 1}"):
        hv = op(v)
        rayleigh = float(dot64(v, hv))
        w = _project_out(hv, found)
        norm = _norm(w)
        if norm == 0.0:  # H v = 0 on the complement: v is an eigenvector of eigenvalue 0
            return rayleigh, v
        converged = value is not None and abs(rayleigh - value) <= tol * (abs(value) + 1e-6)
        value, v = rayleigh, w / norm
        if converged:
            return value, v
    log.warning(
        "power iteration for eigenpair %d did not converge in %d iterations", index + 1, iters
    )
    return value, v


# --- Lanczos and the spectral density -------------------------------------------------------


@dataclass(frozen=True)
class Tridiagonal:
    """The Lanczos matrix T = Q^T H Q: diagonal ``alpha`` (m) and off-diagonal ``beta`` (m-1),
    float64 on the CPU. A zero in ``beta`` marks a restart after the Krylov space became
    invariant."""

    alpha: Tensor
    beta: Tensor

    def matrix(self) -> Tensor:
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Gauss quadrature of the start vector's spectral measure: T's eigenvalues (nodes,
        ascending) and the squared first components of its eigenvectors (weights, sum 1)."""
        nodes, vectors = torch.linalg.eigh(self.matrix())
        return nodes, vectors[0] ** 2


def lanczos(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    iters: int = 30,
    seed: int = 0,
    start: Vector | None = None,
    progress: bool = False,
) -> Tridiagonal:
    """``iters`` Lanczos steps on H (at most its dimension) with full reorthogonalisation.

    The start vector is ``start`` normalised, or a normalised Rademacher vector drawn with
    ``seed``. With m the steps taken, ``sum(w * node^p) = q1 . H^p q1`` for p < 2m. When the
    Krylov space becomes invariant (after at most as many steps as H has distinct eigenvalues), it
    restarts from a fresh orthogonal vector with a zero off-diagonal; m steps span m dimensions.
    """
    op = HessianOperator(loss_fn, params)
    gen = _generator(op.device, seed)
    return _lanczos(op, iters, gen, None if start is None else op.flat(start), progress)


def _lanczos(
    op: HessianOperator,
    iters: int,
    gen: torch.Generator,
    start: Tensor | None,
    progress: bool,
) -> Tridiagonal:
    if iters < 1:
        raise ZsqError(f"iters={iters}; use at least 1 Lanczos step (30-100 is usual)")
    steps = min(iters, op.dim)
    q = _rademacher(op, gen) if start is None else start.clone()
    norm = _norm(q)
    if norm == 0.0:
        raise ZsqError("the Lanczos start vector is zero; pass a nonzero vector")
    basis = [q / norm]
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    breakdown = BREAKDOWN_EPS * torch.finfo(op.dtype).eps
    for j in _progress(range(steps), progress, "Lanczos"):
        w = op(basis[j])
        alphas.append(float(dot64(w, basis[j])))
        w = w - alphas[j] * basis[j]
        if j > 0:
            w = w - betas[j - 1] * basis[j - 1]
        if j == steps - 1:
            break
        w = _project_out(w, basis)
        beta = _norm(w)
        scale = max(scale, abs(alphas[j]), beta)
        if beta <= breakdown * scale:
            w, beta = _restart_vector(op, gen, basis), 0.0
            if w is None:
                break
        else:
            w = w / beta
        betas.append(beta)
        basis.append(w)
    return Tridiagonal(
        torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)
    )


def _restart_vector(
    op: HessianOperator, gen: torch.Generator, basis: Sequence[Tensor]
) -> Tensor | None:
    """A unit vector orthogonal to ``basis``, from a Gaussian draw (a +-1 vector may lie in the
    span exactly); None when a few draws leave too little outside the span to trust."""
    for _ in range(RESTART_TRIES):
        x = torch.randn(op.dim, generator=gen, device=op.device, dtype=op.dtype)
        w = _project_out(x, basis)
        norm = _norm(w)
        if norm > RESTART_MIN_FRACTION * _norm(x):
            return w / norm
    log.warning("Lanczos found no new direction after %d steps; stopping there", len(basis))
    return None


@dataclass(frozen=True)
class Density:
    """Eigenvalue density of H by stochastic Lanczos quadrature: per run, Ritz ``nodes`` and
    ``weights`` (each run's weights sum to 1); ``dim`` is the Hessian's size."""

    nodes: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]
    dim: int

    @property
    def runs(self) -> int:
        return len(self.nodes)

    def moment(self, p: int) -> float:
        """Run average of ``sum(w * node^p)``: an estimate of tr(H^p) / dim."""
        total = sum(float((w * n**p).sum()) for n, w in zip(self.nodes, self.weights, strict=True))
        return total / self.runs


def slq_density(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    iters: int = 30,
    runs: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> Density:
    """Eigenvalue density of H: ``runs`` Lanczos runs of ``iters`` steps from independent
    normalised Rademacher vectors (one generator seeded by ``seed``), averaged."""
    if runs < 1:
        raise ZsqError(f"runs={runs}; use at least 1 SLQ run")
    op = HessianOperator(loss_fn, params)
    gen = _generator(op.device, seed)
    nodes, weights = [], []
    for _ in _progress(range(runs), progress and runs > 1, "SLQ runs"):
        n, w = _lanczos(op, iters, gen, None, progress).ritz()
        nodes.append(n)
        weights.append(w)
    return Density(tuple(nodes), tuple(weights), op.dim)


def density_on_grid(density: Density, grid: Tensor, sigma: float) -> Tensor:
    """The density broadened by Gaussians of width ``sigma`` at ``grid`` (float64, grid's shape).

    Integrates to 1 over a grid covering the nodes with a margin of a few ``sigma``.
    """
    if sigma <= 0:
        raise ZsqError(f"sigma={sigma}; use a positive Gaussian width (e.g. 1% of the spectrum)")
    x = grid.detach().to("cpu", torch.float64).unsqueeze(-1)
    total = torch.zeros(grid.shape, dtype=torch.float64)
    for nodes, weights in zip(density.nodes, density.weights, strict=True):
        kernel = torch.exp(-0.5 * ((x - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        total += (kernel * weights).sum(-1)
    return total / density.runs


# --- loss surface ----------------------------------------------------------------------------


@torch.no_grad()
def loss_along(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    direction: Vector,
    ks: Iterable[float],
    progress: bool = False,
) -> list[float]:
    """``loss_fn()`` at ``params + k * direction`` for each k (Fig. 2c), under ``no_grad``.

    The parameters are changed in place and copied back from a saved copy afterwards (also on an
    error), so they are restored bit for bit.
    """
    params = check_params(params)
    steps = unflatten(to_flat(direction, params), params)
    saved = [p.detach().clone() for p in params]
    losses: list[float] = []
    try:
        for k in _progress(list(ks), progress, "loss surface"):
            for p, p0, d in zip(params, saved, steps, strict=True):
                p.copy_(p0 + k * d)
            loss = loss_fn()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ZsqError("loss_fn must return a scalar tensor; reduce it with .mean()")
            losses.append(float(loss))
    finally:
        for p, p0 in zip(params, saved, strict=True):
            p.copy_(p0)
    return losses
