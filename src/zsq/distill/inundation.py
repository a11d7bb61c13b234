"""Gradient inundation (AIT, Sec. 4.2): scale each quantized layer's update so that a share rho of
its integer weights changes every step.

**The update.** Before the wrapped optimiser steps, the update it is about to make to every
quantized weight is computed from its state in float64 (:func:`exact_update`: SGD with or
without (Nesterov) momentum, Adam/AdamW, RMSprop, with all their options), in two forms: the
*search direction*, which leaves this step's weight decay out, and the *applied update*, weight
decay included (as the reference: kappa is searched on ``g + m * (m * buf + g)`` but scales the
whole step). Then the optimiser steps as usual, so its state (momentum buffer, moments) sees the
raw gradient, and each quantized weight is overwritten with ``old + kappa * applied``, rounded
once to the weight's dtype. Reading the update back as ``new - old`` instead loses most of it to
float32 cancellation at small learning rates. Other optimisers fall back to that read-back (both
forms are then ``new - old``).

**What counts as changed** (``count``): ``"codes"`` (default, paper Eq. 11 and the reference)
compares the integer codes ``q`` of Eq. 1, with each range recomputed on the moved weights; a
zero-point step shifts every ``q`` of a channel, so it counts the whole channel. A layer that
quantizes on a fixed grid (a reconstruction's learned steps, under ``--init genie``) is counted
on that grid, the codes its student computes with. ``"levels"``
compares ``q + z``, which a zero-point step alone does not change. The share f(kappa) is
``changed / numel`` in float32, compared with rho in float32, as the reference does.

**The kappa search** (``search``), per layer with ``f`` on the search direction:

- ``"reference"`` (default), the official code's rule: if f(1) >= rho, kappa = 1. Otherwise
  double kappa (2, 4, ...) until f >= rho or the cap is reached, then bisect between kappa/2 and
  kappa: at most ``search_steps`` (5) midpoints, each one replacing the lower end if its f < rho
  and the upper end otherwise, stopping early once |f - rho| < rho * ``tolerance`` (rho/100);
  kappa is the last midpoint, whose f may fall slightly short of rho. When the cap falls short
  the bisection runs between cap/2 and cap all the same (kappa ends near the cap).
- ``"nearest-above"``: the target is rho * numel rounded to whole weights, at least one, with half
  a weight of slack; the smallest doubling that reaches it is taken (kappa = 1 or the cap with no
  bisection when f(1) reaches it, when the cap falls short, or when the first hit is within the
  tolerance), else the bisection as above with early stop at |f - target| < max(target *
  tolerance, half a weight); kappa is, among the values evaluated whose f reaches the target, the
  one with the smallest f (Eq. 10's argmin taken from above).

The cap is the largest power of two within ``warmup_cap`` (128, as the reference's "stop once
kappa > 100") during the GI warm-up and within ``max_kappa`` always: the reference doubles
without limit after the warm-up, so a zero gradient loops there; here the kappa differs from the
reference's only where it would exceed ``max_kappa``. A layer whose search direction is all zero
reports kappa = 1 (nothing moves). Non-finite gradient entries are zeroed before the optimiser
sees them. All of it runs on the device without host synchronisation; layers whose weights have
the same 2-D shape, format and parameter group are searched as one stacked tensor, so the number
of kernels per step depends on the number of distinct layer shapes, not on the network's depth.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from zsq.errors import ZsqError
from zsq.execution import compiled_function
from zsq.quant.modules import QuantConv2d, QuantLinear
from zsq.quant.quantizer import qparams_from_range, quantize_codes

QuantLayer = QuantConv2d | QuantLinear
Count = Literal["codes", "levels"]
Search = Literal["reference", "nearest-above"]
COUNTS: tuple[str, ...] = ("codes", "levels")
WARMUP_CAP = 128.0
MAX_KAPPA = 2.0**16
# kappa candidates x stacked weights evaluated at once: large on a GPU (fewer launches), cache-sized
# on a CPU (each eager op is a pass over memory)
SEARCH_CHUNK_ELEMENTS = {"cuda": 2**25, "cpu": 2**18}


@dataclass
class InundationStats:
    """Per-layer kappa used and share of integer weights that changed in one step (device
    tensors)."""

    kappa: Tensor
    fraction: Tensor


@dataclass(frozen=True)
class WeightFormat:
    """How a layer's weights are quantized: what the code computation needs to know.
    ``fixed``: the layer quantizes on a fixed grid (a reconstruction's learned steps, LAPQ's
    clipping range) instead of its weights' own min/max, so codes are counted on that grid
    (:func:`fixed_grid`)."""

    bits: int
    per_channel: bool
    symmetric: bool
    fixed: bool = False

    @classmethod
    def of(cls, layer: QuantLayer) -> WeightFormat:
        fixed = layer.w_scale is not None or layer.w_range_min is not None
        return cls(layer.wbits, layer.w_channel_axis == 0, layer.w_symmetric, fixed)


Grid = tuple[Tensor, Tensor] | None  # (scale, zero point), each (..., out_channels, 1)


def fixed_grid(layer: QuantLayer) -> Grid:
    """The scale and zero point a layer with a fixed grid quantizes on, shaped (out, 1) to
    broadcast over its flattened weights; None for a layer whose range follows its weights (the
    reference's min/max, recomputed on every move)."""
    if not WeightFormat.of(layer).fixed:
        return None
    out = layer.weight.shape[0]
    scale, zero_point = layer.weight_qparams()
    return tuple(t.detach().reshape(-1, 1).expand(out, 1) for t in (scale, zero_point))


def check_count(count: str) -> None:
    if count not in COUNTS:
        raise ZsqError(f"unknown gradient-inundation count {count!r}; use one of {COUNTS}")


def weight_integers(
    weights: Tensor, fmt: WeightFormat, count: Count = "codes", grid: Grid = None
) -> Tensor:
    """Integer code ``q`` (``count="codes"``) or level ``q + z`` (``"levels"``) of every weight of
    ``weights`` (..., out_channels, fan_in): on ``grid`` when the layers have a fixed one, else
    with the range taken per output channel (last dim) or per matrix (last two dims)."""
    if grid is not None:
        scale, zero_point = grid
    else:
        dims = (-1,) if fmt.per_channel else (-2, -1)
        lo, hi = weights.amin(dim=dims, keepdim=True), weights.amax(dim=dims, keepdim=True)
        scale, zero_point = qparams_from_range(lo, hi, fmt.bits, fmt.symmetric)
    codes = quantize_codes(weights, scale, zero_point, fmt.bits)
    return codes if count == "codes" else codes + zero_point


def layer_codes(layer: QuantLayer, weight2d: Tensor, count: Count = "codes") -> Tensor:
    """Codes (or levels) of one layer's weights, flattened to (out_channels, fan_in)."""
    return weight_integers(weight2d, WeightFormat.of(layer), count, fixed_grid(layer))


def changed_share(new: Tensor, old: Tensor) -> Tensor:
    """Share of entries that differ over the last two dims, as float32 ``count / numel`` (the
    reference's arithmetic, so comparisons with rho agree with it to the bit)."""
    numel = new.shape[-2] * new.shape[-1]
    return (new != old).sum(dim=(-2, -1), dtype=torch.float32) / numel


def code_change_fraction(
    fmt: WeightFormat,
    old: Tensor,
    delta: Tensor,
    old_codes: Tensor,
    kappas: Tensor,
    count: Count = "codes",
    grid: Grid = None,
) -> Tensor:
    """Share of codes (or levels) that differ from ``old_codes`` after moving ``old`` by
    ``kappa * delta`` (ranges recomputed on the moved weights, or on ``grid`` when fixed).

    ``old``/``delta``/``old_codes``: (layers, out_channels, fan_in); ``kappas``: (k, layers), one
    kappa per candidate and layer. Returns (k, layers).
    """
    limit = SEARCH_CHUNK_ELEMENTS.get(old.device.type, SEARCH_CHUNK_ELEMENTS["cuda"])
    chunk = max(1, limit // max(old.numel(), 1))
    parts = []
    for k in kappas.split(chunk):
        moved = old + k[..., None, None] * delta
        parts.append(changed_share(weight_integers(moved, fmt, count, grid), old_codes))
    return torch.cat(parts)


def _doublings(
    fmt: WeightFormat,
    count: Count,
    old: Tensor,
    delta: Tensor,
    old_codes: Tensor,
    grid: Grid,
    threshold: Tensor,
    ladder: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate every doubling at once. Returns the first kappa whose share reaches
    ``threshold`` (the top of the ladder if none does), its share, and its index."""
    candidates = ladder[:, None].expand(-1, old.shape[0])
    fractions = code_change_fraction(fmt, old, delta, old_codes, candidates, count, grid)
    reached = fractions >= threshold
    first = torch.where(reached.any(dim=0), reached.float().argmax(dim=0), len(ladder) - 1)
    return ladder[first], fractions.gather(0, first[None])[0], first


def _one_unless_still(kappa: Tensor, delta: Tensor) -> Tensor:
    """Kappa 1 for layers with nothing to scale (an all-zero direction)."""
    still = delta.abs().amax(dim=(-2, -1)) == 0
    return torch.where(still, torch.ones_like(kappa), kappa)


def search_reference_stacked(
    fmt: WeightFormat,
    count: Count,
    old: Tensor,
    delta: Tensor,
    old_codes: Tensor,
    grid: Grid,
    rho: Tensor,
    tolerance: Tensor,
    ladder: Tensor,
    search_steps: int,
) -> tuple[Tensor, Tensor]:
    """The reference rule (module docstring) for a stack of same-shaped layers.

    ``old``/``delta``/``old_codes``: (layers, out, fan_in); ``rho`` and ``tolerance`` (absolute,
    rho/100) are float32 0-d tensors, so a compiled version serves every rho; ``ladder`` is
    1, 2, 4, ... up to the cap (:func:`kappa_ladder`). Returns kappa and its share, per layer.
    """
    hi, fraction, first = _doublings(fmt, count, old, delta, old_codes, grid, rho, ladder)
    kappa, lo = hi, hi / 2
    done = first == 0  # f(1) reaches rho (or the cap is 1): kappa 1, no bisection
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        f_mid = code_change_fraction(fmt, old, delta, old_codes, mid[None], count, grid)[0]
        active = ~done
        kappa = torch.where(active, mid, kappa)
        fraction = torch.where(active, f_mid, fraction)
        done = done | ((f_mid - rho).abs() < tolerance)
        below = f_mid < rho
        lo = torch.where(active & below, mid, lo)
        hi = torch.where(active & ~below, mid, hi)
    return _one_unless_still(kappa, delta), fraction


def search_nearest_above_stacked(
    fmt: WeightFormat,
    count: Count,
    old: Tensor,
    delta: Tensor,
    old_codes: Tensor,
    grid: Grid,
    target: Tensor,
    slack: Tensor,
    tolerance: Tensor,
    ladder: Tensor,
    search_steps: int,
) -> tuple[Tensor, Tensor]:
    """The ``nearest-above`` rule (module docstring) for a stack of same-shaped layers.

    ``target`` (the share to reach), ``slack`` (half a weight) and ``tolerance`` are 0-d tensors
    from :func:`nearest_above_settings`.
    """
    hi, fraction, first = _doublings(
        fmt, count, old, delta, old_codes, grid, target - slack, ladder
    )
    kappa, lo = hi, hi / 2
    reached_any = fraction >= target - slack
    # kappa = 1 needs no search, nor does a cap that falls short, nor a first hit close enough
    done = (first == 0) | ~reached_any | ((fraction - target).abs() < tolerance)
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        f_mid = code_change_fraction(fmt, old, delta, old_codes, mid[None], count, grid)[0]
        active = ~done
        above = f_mid >= target - slack
        # a candidate must still reach the target; keep the one nearest to it
        better = active & above & (f_mid <= fraction)
        kappa = torch.where(better, mid, kappa)
        fraction = torch.where(better, f_mid, fraction)
        done = done | ((f_mid - target).abs() < tolerance)
        hi = torch.where(active & above, mid, hi)
        lo = torch.where(active & ~above, mid, lo)
    return _one_unless_still(kappa, delta), fraction


def kappa_ladder(cap: float, device: torch.device) -> Tensor:
    """The doubling candidates 1, 2, 4, ... up to the largest power of two within ``cap``."""
    return 2.0 ** torch.arange(int(math.floor(math.log2(cap))) + 1, device=device)


def _scalars(values: Sequence[float], device: torch.device) -> tuple[Tensor, ...]:
    return tuple(torch.full((), v, dtype=torch.float32, device=device) for v in values)


def reference_settings(
    rho: float, numel: int, tolerance: float, cap: float, device: torch.device
) -> tuple[Tensor, ...]:
    """(rho, absolute tolerance, ladder) for :func:`search_reference_stacked`."""
    return (*_scalars((rho, rho * tolerance), device), kappa_ladder(cap, device))


def nearest_above_settings(
    rho: float, numel: int, tolerance: float, cap: float, device: torch.device
) -> tuple[Tensor, ...]:
    """(target, slack, tolerance, ladder) for :func:`search_nearest_above_stacked`: the target is
    the nearest whole number of weights, at least one; shares are multiples of 1/numel, so
    comparisons keep half a weight (``slack``) to spare."""
    target = max(1, round(rho * numel)) / numel
    slack = 0.5 / numel
    values = (target, slack, max(target * tolerance, slack))
    return (*_scalars(values, device), kappa_ladder(cap, device))


SEARCH_RULES: dict[str, tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., tuple]]] = {
    "reference": (search_reference_stacked, reference_settings),
    "nearest-above": (search_nearest_above_stacked, nearest_above_settings),
}


def check_search(search: str) -> None:
    if search not in SEARCH_RULES:
        rules = tuple(SEARCH_RULES)
        raise ZsqError(f"unknown gradient-inundation search {search!r}; use one of {rules}")


def search_kappa(
    layer: QuantLayer,
    old: Tensor,
    delta: Tensor,
    rho: float,
    cap: float,
    search_steps: int = 5,
    tolerance: float = 0.01,
    *,
    count: Count = "codes",
    search: Search = "reference",
) -> tuple[Tensor, Tensor]:
    """Kappa for one layer (a 0-d device tensor) and the share of codes it changes.

    ``old``/``delta``: the layer's weights and search direction flattened to (out, fan_in).
    """
    check_count(count)
    check_search(search)
    fmt, grid = WeightFormat.of(layer), fixed_grid(layer)
    rule, settings = SEARCH_RULES[search]
    old, delta = old[None], delta[None]
    grid = None if grid is None else (grid[0][None], grid[1][None])
    kappa, fraction = rule(
        fmt,
        count,
        old,
        delta,
        weight_integers(old, fmt, count, grid),
        grid,
        *settings(rho, old[0].numel(), tolerance, cap, old.device),
        search_steps,
    )
    return kappa[0], fraction[0]


# --- the optimiser's exact update -------------------------------------------------------------


@dataclass
class _Stack:
    """Layers whose weights stack into one (layers, out, fan_in) tensor."""

    fmt: WeightFormat
    group: int | None  # the optimiser parameter group holding all of them, when known
    weights: list[torch.nn.Parameter]
    positions: list[int]  # where each layer sits in the caller's layer order
    layers: list[QuantLayer] = field(default_factory=list)

    def flat(self) -> Tensor:
        return torch.stack([w.detach().reshape(w.shape[0], -1) for w in self.weights])

    @functools.cached_property
    def grid(self) -> Grid:
        """The layers' fixed grids stacked to (layers, out, 1), None when they have none; made
        once (a grid stays fixed while the student trains; a resume regroups the layers)."""
        if not self.fmt.fixed:
            return None
        grids = [fixed_grid(layer) for layer in self.layers]
        return torch.stack([g[0] for g in grids]), torch.stack([g[1] for g in grids])

    def write(self, values: Tensor) -> None:
        torch._foreach_copy_(
            self.weights,
            [v.view_as(w) for v, w in zip(values.unbind(0), self.weights, strict=True)],
        )


class LayerStacks:
    """Quantized layers grouped by weight shape, format and (optionally) parameter group, for
    batched code computations. Per-stack results (one value per layer) are put back in the
    original layer order by :meth:`in_layer_order`.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, QuantLayer]],
        group_of: Callable[[torch.nn.Parameter], int] | None = None,
    ) -> None:
        stacks: dict[tuple, _Stack] = {}
        for position, (_, layer) in enumerate(layers):
            shape = (layer.weight.shape[0], layer.weight[0].numel())
            fmt = WeightFormat.of(layer)
            group = None if group_of is None else group_of(layer.weight)
            stack = stacks.setdefault((shape, fmt, group), _Stack(fmt, group, [], []))
            stack.weights.append(layer.weight)
            stack.positions.append(position)
            stack.layers.append(layer)
        self.stacks = list(stacks.values())
        order = [p for s in self.stacks for p in s.positions]
        self._inverse = torch.argsort(torch.tensor(order))
        self._inverse_on: dict[torch.device, Tensor] = {}

    def __iter__(self):
        return iter(self.stacks)

    def in_layer_order(self, per_stack: Sequence[Tensor]) -> Tensor:
        if not per_stack:
            return torch.zeros(0)
        values = torch.cat(list(per_stack))
        index = self._inverse_on.get(values.device)
        if index is None:  # moved to the device once; later steps stay free of copies
            index = self._inverse_on[values.device] = self._inverse.to(values.device)
        return values[index]


class _StackView:
    """One stack's gradients, weights and optimiser state before the step, in float64.

    Missing state (a layer's first step) reads as zeros, which is how torch initialises Adam's
    and RMSprop's; :meth:`fresh` tells SGD where its buffer is still to be created.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stack: _Stack, old: Tensor) -> None:
        self.group = optimizer.param_groups[stack.group]
        self.states = [optimizer.state.get(w, {}) for w in stack.weights]
        self.weights = old.double()
        self.device = old.device
        grads = [w.grad for w in stack.weights]
        self.active = self.per_layer([float(g is not None) for g in grads])
        zeros = torch.zeros_like(old[0])
        grad = torch.stack([zeros if g is None else g.reshape(zeros.shape) for g in grads])
        self.grad = -grad.double() if self.group.get("maximize", False) else grad.double()

    def state(self, key: str) -> Tensor:
        entries = [s.get(key) for s in self.states]
        if all(e is None for e in entries):
            return torch.zeros_like(self.weights)
        zeros = torch.zeros_like(self.weights[0])
        stacked = torch.stack([zeros if e is None else e.reshape(zeros.shape) for e in entries])
        return stacked.double()

    def fresh(self, key: str) -> Tensor | float:
        """1 for layers that have no ``key`` in their state yet, else 0 (per layer)."""
        return self.per_layer([float(s.get(key) is None) for s in self.states])

    def steps(self) -> Tensor | float:
        """Steps taken so far, per layer (Adam's bias correction)."""
        steps = [s.get("step", 0.0) for s in self.states]
        if all(isinstance(t, Tensor) and t.device == self.device for t in steps):
            return torch.stack(steps).to(torch.float64).view(-1, 1, 1)
        return self.per_layer([float(t) for t in steps])  # host values: no device sync

    def per_layer(self, values: list[float]) -> Tensor | float:
        """One value per layer, broadcastable over the stack; a plain number when all agree."""
        if len(set(values)) == 1:
            return values[0]
        host = torch.tensor(values, dtype=torch.float64).view(-1, 1, 1)
        return host.to(self.device, non_blocking=True)


Step = Callable[[Tensor], Tensor]  # gradient (weight decay added or not) -> the weight change


def _sgd_step(view: _StackView) -> Step:
    group = view.group
    lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
    if momentum == 0:
        return lambda grad: -lr * grad
    buf = view.state("momentum_buffer")
    # torch starts the buffer as the gradient itself, later it adds (1 - dampening) * gradient
    keep = 1 - group["dampening"] * (1 - view.fresh("momentum_buffer"))

    def step(grad: Tensor) -> Tensor:
        new_buf = momentum * buf + keep * grad
        return -lr * (grad + momentum * new_buf if nesterov else new_buf)

    return step


def _adam_step(view: _StackView) -> Step:
    group = view.group
    lr, eps, (beta1, beta2) = group["lr"], group["eps"], group["betas"]
    exp_avg, exp_avg_sq = view.state("exp_avg"), view.state("exp_avg_sq")
    peak = view.state("max_exp_avg_sq") if group.get("amsgrad", False) else None
    t = view.steps() + 1
    correction1, correction2 = 1 - beta1**t, 1 - beta2**t

    def step(grad: Tensor) -> Tensor:
        m = beta1 * exp_avg + (1 - beta1) * grad
        v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        if peak is not None:
            v = torch.maximum(peak, v)
        denom = v.sqrt() / correction2**0.5 + eps
        return -lr / correction1 * m / denom

    return step


def _rmsprop_step(view: _StackView) -> Step:
    group = view.group
    lr, alpha, eps, momentum = group["lr"], group["alpha"], group["eps"], group["momentum"]
    square_avg, buf = view.state("square_avg"), view.state("momentum_buffer")
    grad_avg = view.state("grad_avg") if group.get("centered", False) else None

    def step(grad: Tensor) -> Tensor:
        v = alpha * square_avg + (1 - alpha) * grad * grad
        if grad_avg is not None:
            mean = alpha * grad_avg + (1 - alpha) * grad
            v = v - mean * mean
        scaled = grad / (v.sqrt() + eps)
        return -lr * (momentum * buf + scaled if momentum > 0 else scaled)

    return step


UPDATE_RULES: dict[type, Callable[[_StackView], Step]] = {
    torch.optim.SGD: _sgd_step,
    torch.optim.Adam: _adam_step,
    torch.optim.AdamW: _adam_step,
    torch.optim.RMSprop: _rmsprop_step,
}


def exact_update(
    optimizer: torch.optim.Optimizer, stack: _Stack, old: Tensor
) -> tuple[Tensor, Tensor]:
    """(applied update, search direction) of ``stack``'s weights for the optimiser's next step,
    computed from its state in float64; call before ``optimizer.step()``.

    The applied update includes weight decay (L2 folded into the gradient, or AdamW's decoupled
    shrink), the search direction leaves this step's decay out. Layers without a gradient get
    zero. The search direction is returned in ``old``'s dtype, the applied update in float64.
    """
    view = _StackView(optimizer, stack, old)
    step = UPDATE_RULES[type(optimizer)](view)
    decay = view.group.get("weight_decay", 0)
    search = step(view.grad)
    if decay == 0:
        applied = search
    elif view.group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)):
        applied = search - view.group["lr"] * decay * view.weights
    else:
        applied = step(view.grad + decay * view.weights)
    return applied * view.active, (search * view.active).to(old.dtype)


# --- the wrapper ------------------------------------------------------------------------------


class GradientInundation:
    """Wraps a torch optimiser and inundates the updates of quantized weights.

    ``layers`` are the (name, QuantConv2d/QuantLinear) pairs whose weights get GI; their weights
    must be parameters of ``optimizer``. Other parameters (biases, BN, ...) update normally.
    ``count`` and ``search`` choose what counts as changed and the kappa rule (module docstring).
    ``compile_mode`` (a ``torch.compile`` mode) compiles the search: one fused program per layer
    shape, worth it on a GPU, where the eager search is bound by kernel launches.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        layers: Sequence[tuple[str, QuantLayer]],
        *,
        rho: float,
        warmup: bool = False,
        warmup_cap: float = WARMUP_CAP,
        max_kappa: float = MAX_KAPPA,
        search_steps: int = 5,
        tolerance: float = 0.01,
        count: Count = "codes",
        search: Search = "reference",
        compile_mode: str | None = None,
    ) -> None:
        if not 0 < rho < 1:
            raise ZsqError(f"gradient inundation rho={rho} must be in (0, 1), e.g. 1e-3")
        if max_kappa < 1 or warmup_cap < 1:
            raise ZsqError("kappa caps must be >= 1")
        check_count(count)
        check_search(search)
        self.optimizer = optimizer
        self.layers = [(n, m) for n, m in layers if m.wbits is not None]
        if not self.layers:
            raise ZsqError("gradient inundation needs at least one quantized weight layer")
        group_of = {
            id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]
        }
        missing = [n for n, m in self.layers if id(m.weight) not in group_of]
        if missing:
            raise ZsqError(f"layers {missing[:5]} are not optimised by the given optimizer")
        self.rho = rho
        self.warmup = warmup
        self.warmup_cap = warmup_cap
        self.max_kappa = max_kappa
        self.search_steps = search_steps
        self.tolerance = tolerance
        self.count = count
        self._group_of = lambda p: group_of[id(p)]
        self.regroup()
        rule, self._settings_for = SEARCH_RULES[search]
        self._search = compiled_function(rule, compile_mode) if compile_mode else rule
        self._exact = type(optimizer) in UPDATE_RULES
        self._settings: dict[tuple, tuple[Tensor, ...]] = {}

    def regroup(self) -> None:
        """Group the layers again by what they quantize on: after a resume has restored the
        fixed grids a start (``init``) gave them."""
        self.stacks = LayerStacks(self.layers, self._group_of)

    @property
    def cap(self) -> float:
        return min(self.warmup_cap, self.max_kappa) if self.warmup else self.max_kappa

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _device_settings(self, stack: _Stack, device: torch.device) -> tuple[Tensor, ...]:
        """Search constants as device tensors, rebuilt only when rho or the cap changes."""
        numel = stack.weights[0].numel()
        key = (self.rho, self.cap, numel, device)
        if key not in self._settings:
            self._settings[key] = self._settings_for(
                self.rho, numel, self.tolerance, self.cap, device
            )
        return self._settings[key]

    @torch.no_grad()
    def step(self) -> InundationStats:
        sanitize_grads(self.optimizer)
        olds = [stack.flat() for stack in self.stacks]
        updates = [
            exact_update(self.optimizer, stack, old) if self._exact else None
            for stack, old in zip(self.stacks, olds, strict=True)
        ]
        self.optimizer.step()
        kappas, fractions = [], []
        for stack, old, update in zip(self.stacks, olds, updates, strict=True):
            if update is None:  # an optimiser without an update rule here: read back its step
                update = (stack.flat() - old,) * 2
            applied, direction = update
            grid = stack.grid
            old_codes = weight_integers(old, stack.fmt, self.count, grid)
            settings = self._device_settings(stack, old.device)
            kappa, _ = self._search(
                stack.fmt, self.count, old, direction, old_codes, grid, *settings,
                self.search_steps,
            )  # fmt: skip
            moved = old.to(applied.dtype) + kappa.to(applied.dtype)[:, None, None] * applied
            new = moved.to(old.dtype)
            stack.write(new)
            kappas.append(kappa)
            fractions.append(
                changed_share(weight_integers(new, stack.fmt, self.count, grid), old_codes)
            )
        return InundationStats(
            self.stacks.in_layer_order(kappas), self.stacks.in_layer_order(fractions)
        )

    def state_dict(self) -> dict:
        return {"rho": self.rho, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.rho = state["rho"]
        self.warmup = state["warmup"]


@torch.no_grad()
def sanitize_grads(optimizer: torch.optim.Optimizer) -> None:
    """Zero non-finite gradient entries in place (no host sync)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


class CrossingMeter:
    """Measures, for optimisers without GI, the share of each layer's integer codes (or levels,
    ``count``) that one step changes (the paper's Fig. 3b/c counts)."""

    def __init__(self, layers: Sequence[tuple[str, QuantLayer]], count: Count = "codes") -> None:
        check_count(count)
        self.layers = [(n, m) for n, m in layers if m.wbits is not None]
        self.count = count
        self.regroup()
        self._before: list[Tensor] = []

    def regroup(self) -> None:
        """See :meth:`GradientInundation.regroup`."""
        self.stacks = LayerStacks(self.layers)

    @torch.no_grad()
    def before(self) -> None:
        self._before = [weight_integers(s.flat(), s.fmt, self.count, s.grid) for s in self.stacks]

    @torch.no_grad()
    def after(self) -> Tensor:
        fractions = [
            changed_share(weight_integers(s.flat(), s.fmt, self.count, s.grid), old)
            for s, old in zip(self.stacks, self._before, strict=True)
        ]
        return self.stacks.in_layer_order(fractions)
