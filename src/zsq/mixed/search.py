"""Differentiable bit-width search under a hard budget (HDX's idea applied to weight widths).

Every searched layer holds logits ``alpha_l`` over the candidate widths; its weight in the
forward pass is the mixture ``sum_c softmax(alpha_l)_c * FQ_c(W_l)``, so the KL between the
teacher and the mixed student is differentiable in the logits, and so is the expected cost
``E = sum_l sum_c p_lc * cost_lc``. A copy of the student is distilled on synthetic samples
while the logits are trained.

A penalty on ``E`` never guarantees the budget: too small a weight ends over it, too large one
ignores the loss. The ``constrained`` mode instead changes the logits' gradient whenever the
expected cost is over the budget (:func:`constrained_gradient`): the plain step is projected onto
the half-space of steps whose linearised cost change brings ``E`` back to the budget, so the
search ends inside it without a tuned weight. The final discrete choice is the argmax when it
fits the budget, else the most probable allocation that does (an exact repair, by the solver).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.mixed.solver import cheapest_cost, solve_allocation
from zsq.numerics.losses import kl_to_teacher
from zsq.quant.model import quant_layers
from zsq.quant.modules import QuantLayer
from zsq.quant.quantizer import check_bits, fake_quantize, qparams_from_range, tensor_minmax

log = logging.getLogger(__name__)

MODES = ("constrained", "penalty")
KL_REDUCTION = "batchmean"  # the true KL per sample: the logits' lr does not scale with classes
WEIGHT_MOMENTUM = 0.9  # Nesterov SGD as zsq's trainer (DistillRecipe.momentum)
POSTFIX_EVERY = 10  # steps between progress-bar updates of the expected cost
FINAL_SHARPNESS = 20.0  # softmax(sharpness * logits): 1 at the start, this at the last step


@dataclass
class SearchResult:
    """What the search found; costs are in the unit of the ``costs`` it was given."""

    choice: list[int]  # per searched layer, index into `choices`, after repair (within the limit)
    argmax_choice: list[int]  # per layer, argmax of the final probabilities, before repair
    probs: list[list[float]]  # final softmax per layer
    expected_cost: list[float]  # expected cost after every step (the trajectory)
    final_expected_cost: float
    final_cost: float  # cost of `choice`
    repaired: bool  # whether argmax_choice had to be repaired
    seconds: float


def expected_cost(logits: Tensor, costs: Tensor, sharpness: float | Tensor = 1.0) -> Tensor:
    """``sum_l sum_c softmax(sharpness * logits_l)_c * costs[l, c]`` (differentiable)."""
    return (torch.softmax(logits * sharpness, dim=1) * costs).sum()


def sharpness_at(step: int, steps: int, final: float = FINAL_SHARPNESS) -> float:
    """The softmax's inverse temperature, raised geometrically from 1 to ``final``: the width
    probabilities end nearly one-hot, so the expected cost the budget bounds is (nearly) the
    cost of the discrete choice read off at the end."""
    if steps <= 1:
        return final
    return final ** (step / (steps - 1))


def constrained_gradient(
    grad: Tensor, cost_grad: Tensor, cost: float | Tensor, limit: float, lr: float
) -> Tensor:
    """The logits' gradient projected so that the plain step ``alpha - lr * g`` meets the budget.

    With ``E > limit`` the steps whose first-order cost change ``-lr * <d, g'>`` brings ``E`` to
    the budget form the half-space ``lr * <d, g'> >= E - limit``; the Euclidean projection of
    ``g`` onto it is ``g + lam * d`` with the smallest ``lam >= 0``, i.e.
    ``lam = max(0, ((E - limit) / lr - <d, g>) / ||d||^2)``. A gradient already in the
    half-space (or ``E <= limit``, or ``d = 0``) comes back unchanged. Tensor arithmetic only,
    so a step on an accelerator waits for no host synchronisation.
    """
    excess = torch.as_tensor(cost, dtype=grad.dtype, device=grad.device) - limit
    norm2 = cost_grad.pow(2).sum()
    lam = ((excess / lr - (cost_grad * grad).sum()) / norm2).clamp(min=0)
    lam = torch.where((excess > 0) & (norm2 > 0), lam, torch.zeros_like(lam))
    return grad + lam * cost_grad


def differentiable_search(
    teacher: nn.Module,
    student: nn.Module,
    choices: Sequence[int],
    costs: Sequence[Sequence[float]],
    limit: float,
    sample: Callable[[int], Tensor],
    *,
    mode: str = "constrained",
    penalty: float = 1.0,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 0.1,
    weight_lr: float = 1e-5,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> SearchResult:
    """Search per-layer weight widths (indices into ``choices``) within ``limit``.

    ``student`` is ``quantize_model(teacher, spec)`` with activation ranges observed and frozen;
    it is not modified (the search trains a deep copy). ``costs[l][c]`` is the cost of layer
    ``l`` (``quant_layers`` order) at ``choices[c]``, in any additive unit shared with
    ``limit``. The loss is ``kl_to_teacher(..., temperature, reduction="batchmean")``; the
    logits step ``lr`` along the loss gradient's direction (normalised: the KL's scale varies by
    orders of magnitude between models, the cost's pull must not drown it), projected when the
    expected cost is over the budget (the projection assumes a plain step); the width
    probabilities are ``softmax(s * logits)`` with ``s`` raised from 1 to ``FINAL_SHARPNESS``
    (:func:`sharpness_at`). The copy's weights take Nesterov SGD steps of ``weight_lr`` (0
    freezes them). ``mode="penalty"`` adds ``penalty * relu(E / limit - 1)`` to the loss
    instead of projecting: the baseline.
    """
    layers = [layer for _, layer in quant_layers(student)]
    cost_table = _check_arguments(layers, choices, costs, limit, mode, penalty, steps, batch_size)
    _check_rates(lr, weight_lr, temperature)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=_cuda_devices(student)):
        torch.manual_seed(seed)
        logits, trajectory = _search(
            teacher,
            student,
            choices,
            cost_table,
            limit,
            sample,
            _Settings(mode, penalty, steps, batch_size, lr, weight_lr, temperature, progress),
        )
    return _result(logits, cost_table, limit, trajectory, time.perf_counter() - started)


@dataclass(frozen=True)
class _Settings:
    mode: str
    penalty: float
    steps: int
    batch_size: int
    lr: float
    weight_lr: float
    temperature: float
    progress: bool


def _search(
    teacher: nn.Module,
    student: nn.Module,
    choices: Sequence[int],
    cost_table: Tensor,
    limit: float,
    sample: Callable[[int], Tensor],
    cfg: _Settings,
) -> tuple[Tensor, list[float]]:
    """The training loop; returns the final logits and the expected cost after every step."""
    device = _device_of(student)
    work = copy.deepcopy(student).eval()  # BN on running statistics, as zsq's trainer
    cost_table = cost_table.to(device, torch.float32)
    logits = torch.zeros(cost_table.shape, device=device, requires_grad=True)
    sharpness = torch.ones((), device=device)  # updated in place every step
    _install_mixtures(work, choices, logits, sharpness)
    weights = [p for p in work.parameters() if p.requires_grad]
    optimizer = None
    if cfg.weight_lr > 0 and weights:
        optimizer = torch.optim.SGD(
            weights, lr=cfg.weight_lr, momentum=WEIGHT_MOMENTUM, nesterov=True
        )
    else:
        for p in weights:
            p.requires_grad_(False)
    was_training = teacher.training
    teacher.eval()
    trajectory: list[Tensor] = []
    try:
        bar = tqdm(range(cfg.steps), desc=f"{cfg.mode} bit search", disable=not cfg.progress)
        for step in bar:
            sharpness.fill_(sharpness_at(step, cfg.steps))
            cost = _step(
                teacher, work, logits, sharpness, cost_table, limit, sample, optimizer, cfg, device
            )
            trajectory.append(cost)
            if cfg.progress and step % POSTFIX_EVERY == 0:  # a host sync: not every step
                bar.set_postfix(expected_cost=f"{float(cost):.4g}", limit=f"{limit:.4g}")
    finally:
        teacher.train(was_training)
    return logits.detach(), torch.stack(trajectory).tolist()


def _step(
    teacher: nn.Module,
    work: nn.Module,
    logits: Tensor,
    sharpness: Tensor,
    cost_table: Tensor,
    limit: float,
    sample: Callable[[int], Tensor],
    optimizer: torch.optim.Optimizer | None,
    cfg: _Settings,
    device: torch.device,
) -> Tensor:
    """One search step; returns the expected cost after it (a 0-d tensor, not synchronised)."""
    x = sample(cfg.batch_size).to(device)
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss = kl_to_teacher(work(x), teacher_logits, cfg.temperature, reduction=KL_REDUCTION)
    cost = expected_cost(logits, cost_table, sharpness)
    (cost_grad,) = torch.autograd.grad(cost, logits)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    logits.grad = None
    loss.backward()
    grad = logits.grad if logits.grad is not None else torch.zeros_like(logits)
    grad = grad / grad.norm().clamp(min=1e-12)  # the direction of lower KL, a step of lr
    step_lr = cfg.lr / sharpness  # a step of lr in the sharpened logits
    if cfg.mode == "penalty":  # the baseline: the penalty's own gradient, unprojected
        over = (cost.detach() > limit).to(grad.dtype)
        grad = grad + cfg.penalty * over * cost_grad / limit
    else:
        grad = constrained_gradient(
            grad.flatten(), cost_grad.flatten(), cost.detach(), limit, step_lr
        ).view_as(logits)
    with torch.no_grad():
        logits.sub_(step_lr * grad)
    if cfg.mode == "constrained":
        back_to_budget(logits, cost_table, sharpness, limit)
    if optimizer is not None:
        optimizer.step()
    with torch.no_grad():
        return expected_cost(logits, cost_table, sharpness)


def back_to_budget(
    logits: Tensor, cost_table: Tensor, sharpness: Tensor, limit: float, tries: int = 20
) -> None:
    """Newton steps on the expected cost alone until it is within the budget again: the
    projected step meets the budget only to first order, and softmax curves."""
    for _ in range(tries):
        with torch.enable_grad():
            cost = expected_cost(logits, cost_table, sharpness)
            (grad,) = torch.autograd.grad(cost, logits)
        excess = float(cost.detach()) - limit
        norm2 = float(grad.pow(2).sum())
        if excess <= 0 or norm2 == 0:
            return
        with torch.no_grad():
            logits.sub_(grad * (excess * 1.01 / norm2))


def _install_mixtures(
    work: nn.Module, choices: Sequence[int], logits: Tensor, sharpness: Tensor
) -> None:
    """Make every quant layer of ``work`` (a private copy) use the mixture of widths."""
    for index, (name, layer) in enumerate(quant_layers(work)):
        if layer.w_range_min is not None or layer.w_offset is not None or layer.w_scale is not None:
            log.warning(
                "layer %s has a fixed weight range or offset tuned for %s bits; the search "
                "quantizes it with its weights' own min/max at every width",
                name,
                layer.wbits,
            )
        layer.fake_quant_weight = functools.partial(
            _mixture_weight, layer, tuple(choices), logits, sharpness, index
        )


def _mixture_weight(
    layer: QuantLayer, choices: tuple[int, ...], logits: Tensor, sharpness: Tensor, index: int
) -> Tensor:
    """``sum_c p_c * FQ_c(W)`` with the layer's granularity and symmetry; the straight-through
    gradient reaches ``W`` with weight ``sum_c p_c = 1``."""
    weight = layer.weight
    probs = torch.softmax(logits[index] * sharpness, dim=0)
    with torch.no_grad():
        wmin, wmax = tensor_minmax(weight, layer.w_channel_axis)
    mixed = weight.new_zeros(())
    for c, bits in enumerate(choices):
        scale, zero_point = qparams_from_range(wmin, wmax, bits, layer.w_symmetric)
        mixed = mixed + probs[c] * fake_quantize(weight, scale, zero_point, bits)
    return mixed


def most_probable(log_probs: Tensor, table: list[list[float]], limit: float) -> list[int]:
    """The allocation maximising the summed log-probability subject to the budget."""
    return solve_allocation((-log_probs).tolist(), table, limit)


def _result(
    logits: Tensor, cost_table: Tensor, limit: float, trajectory: list[float], seconds: float
) -> SearchResult:
    table = cost_table.tolist()
    log_probs = torch.log_softmax(logits.double().cpu() * FINAL_SHARPNESS, dim=1)
    argmax = log_probs.argmax(dim=1).tolist()
    # The most probable allocation within the budget (exact): the argmax itself when it fits.
    choice = argmax if _total(argmax, table) <= limit else most_probable(log_probs, table, limit)
    final_expected = float(expected_cost(logits.double().cpu(), cost_table, FINAL_SHARPNESS))
    final_cost = _total(choice, table)
    repaired = choice != argmax
    log.info(
        "bit search: expected cost %.6g, chosen %.6g, limit %.6g%s (%.1f s)",
        final_expected,
        final_cost,
        limit,
        ", argmax repaired" if repaired else "",
        seconds,
    )
    return SearchResult(
        choice=choice,
        argmax_choice=argmax,
        probs=log_probs.exp().tolist(),
        expected_cost=trajectory,
        final_expected_cost=final_expected,
        final_cost=final_cost,
        repaired=repaired,
        seconds=seconds,
    )


def _total(choice: Sequence[int], costs: Sequence[Sequence[float]]) -> float:
    """Summed in layer order with Python floats, as the solver's budget checks sum."""
    return sum(float(costs[layer][c]) for layer, c in enumerate(choice))


def _check_arguments(
    layers: list[QuantLayer],
    choices: Sequence[int],
    costs: Sequence[Sequence[float]],
    limit: float,
    mode: str,
    penalty: float,
    steps: int,
    batch_size: int,
) -> Tensor:
    """Validate everything that can be checked before any work; returns the cost table."""
    if mode not in MODES:
        raise ZsqError(f"unknown search mode {mode!r}; use one of {MODES}")
    if not choices:
        raise ZsqError("no candidate bit widths; give at least one, e.g. choices=(2, 4, 8)")
    for bits in choices:
        check_bits(bits)
    if not layers:
        raise ZsqError("the student has no quantized layers; pass quantize_model(teacher, spec)")
    if len(costs) != len(layers) or any(len(row) != len(choices) for row in costs):
        raise ZsqError(
            f"costs must have one row per quantized layer ({len(layers)}) with one entry per "
            f"choice ({len(choices)}); got {len(costs)} rows"
        )
    table = torch.tensor([[float(c) for c in row] for row in costs], dtype=torch.float64)
    if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
        raise ZsqError("costs must be finite and non-negative")
    if not math.isfinite(limit) or limit <= 0:
        raise ZsqError(f"the budget {limit!r} must be a positive finite number")
    smallest = cheapest_cost(table.tolist())
    if smallest > limit:
        raise ZsqError(
            f"the budget {limit:.6g} is below the smallest achievable cost {smallest:.6g} "
            "(every layer at its cheapest width); raise the budget"
        )
    if mode == "penalty" and not penalty >= 0:
        raise ZsqError(f"the penalty weight {penalty!r} must be >= 0")
    if steps < 1 or batch_size < 1:
        raise ZsqError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    return table


def _check_rates(lr: float, weight_lr: float, temperature: float) -> None:
    if not lr > 0:
        raise ZsqError(f"the logits' learning rate {lr!r} must be > 0")
    if not weight_lr >= 0:
        raise ZsqError(f"the weights' learning rate {weight_lr!r} must be >= 0 (0 freezes them)")
    if not temperature > 0:
        raise ZsqError(f"the KL temperature {temperature!r} must be > 0")


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _cuda_devices(model: nn.Module) -> list[int]:
    device = _device_of(model)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
