"""Gradient inundation (AIT, Sec. 4.2): scale each quantized layer's update so that a share rho of
its integer weight codes changes every step.

Works around any torch optimiser: the optimiser steps as usual (its state, e.g. the momentum
buffer, sees the raw gradient, as in the reference), the applied update ``delta`` of every
quantized weight is read off, and the weight is set to ``old + kappa * delta`` with the per-layer
``kappa`` found by search. For SGD with Nesterov momentum ``delta = -lr * (g + m * (m * buf + g))``,
exactly the direction the reference scales.

The search (per layer, all on the device, no host synchronisation; layers whose weights have the
same 2-D shape and format are searched together as one stacked tensor, so the number of kernels
per step depends on the number of distinct layer shapes, not on the depth of the network):
1. doubling: the change fraction f(kappa) is evaluated for kappa = 1, 2, 4, ..., cap at once; the
   smallest kappa with f >= rho is taken (kappa = 1 when f(1) >= rho already, the cap if none);
2. binary search between kappa/2 and kappa, at most ``search_steps`` steps, stopping early once
   |f - rho| < rho * tolerance;
3. of the kappas evaluated whose f still reaches rho, the one with the smallest f is used: the
   paper's goal is to *guarantee* that a share rho changes (Eq. 10's argmin, taken from above).
   The target is rounded to a whole number of weights, at least one: a layer with
   rho * numel < 1 still changes one weight per step. f is a step
   function that jumps when a channel's extreme weight moves, so the last bisection point is
   not always the best.
The cap is ``warmup_cap`` (128) during the GI warm-up and ``max_kappa`` always: a zero gradient
cannot loop. Non-finite gradient entries are zeroed before the optimiser sees them, so NaN/Inf
never reach the weights or the optimiser state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from zsq.errors import ZsqError
from zsq.execution import compiled_function
from zsq.quant.modules import QuantConv2d, QuantLinear
from zsq.quant.quantizer import qparams_from_range, quantize_codes

QuantLayer = QuantConv2d | QuantLinear
WARMUP_CAP = 128.0
MAX_KAPPA = 2.0**16
# kappa candidates x stacked weights evaluated at once: large on a GPU (fewer launches), cache-sized
# on a CPU (each eager op is a pass over memory)
SEARCH_CHUNK_ELEMENTS = {"cuda": 2**25, "cpu": 2**18}


@dataclass
class InundationStats:
    """Per-layer kappa used and share of integer codes that changed in one step (device tensors)."""

    kappa: Tensor
    fraction: Tensor


@dataclass(frozen=True)
class WeightFormat:
    """How a layer's weights are quantized: what the level computation needs to know."""

    bits: int
    per_channel: bool
    symmetric: bool

    @classmethod
    def of(cls, layer: QuantLayer) -> WeightFormat:
        return cls(layer.wbits, layer.w_channel_axis == 0, layer.w_symmetric)


def weight_levels(weights: Tensor, fmt: WeightFormat) -> Tensor:
    """Quantization level ``q + z`` of every weight of ``weights`` (..., out_channels, fan_in),
    the range taken per output channel (last dim) or per matrix (last two dims).

    A weight's value is ``(q + z) / S``. Comparing levels rather than raw codes q keeps a
    zero-point step (z moves by one when the channel's min crosses a half step, shifting every q of
    the channel without changing any value) from counting as a crossing.
    """
    dims = (-1,) if fmt.per_channel else (-2, -1)
    lo, hi = weights.amin(dim=dims, keepdim=True), weights.amax(dim=dims, keepdim=True)
    scale, zero_point = qparams_from_range(lo, hi, fmt.bits, fmt.symmetric)
    return quantize_codes(weights, scale, zero_point, fmt.bits) + zero_point


def layer_codes(layer: QuantLayer, weight2d: Tensor) -> Tensor:
    """Quantization levels of one layer's weights, flattened to (out_channels, fan_in)."""
    return weight_levels(weight2d, WeightFormat.of(layer))


def code_change_fraction(
    fmt: WeightFormat, old: Tensor, delta: Tensor, old_levels: Tensor, kappas: Tensor
) -> Tensor:
    """Share of levels that differ from ``old_levels`` after moving ``old`` by ``kappa * delta``
    (ranges recomputed on the moved weights).

    ``old``/``delta``/``old_levels``: (layers, out_channels, fan_in); ``kappas``: (k, layers), one
    kappa per candidate and layer. Returns (k, layers).
    """
    limit = SEARCH_CHUNK_ELEMENTS.get(old.device.type, SEARCH_CHUNK_ELEMENTS["cuda"])
    chunk = max(1, limit // max(old.numel(), 1))
    parts = []
    for k in kappas.split(chunk):
        moved = old + k[..., None, None] * delta
        parts.append((weight_levels(moved, fmt) != old_levels).float().mean(dim=(-2, -1)))
    return torch.cat(parts)


def search_kappa_stacked(
    fmt: WeightFormat,
    old: Tensor,
    delta: Tensor,
    target: Tensor,
    slack: Tensor,
    tolerance: Tensor,
    ladder: Tensor,
    search_steps: int,
) -> tuple[Tensor, Tensor]:
    """Kappa and resulting change fraction for each of a stack of same-shaped layers.

    ``old``/``delta``: (layers, out_channels, fan_in). ``target`` (the share to reach), ``slack``
    (half a weight) and ``tolerance`` are 0-d tensors, so a compiled version serves every rho;
    ``ladder`` is 1, 2, 4, ... up to the cap (:func:`kappa_ladder`).
    """
    old_levels = weight_levels(old, fmt)
    candidates = ladder[:, None].expand(-1, old.shape[0])
    fractions = code_change_fraction(fmt, old, delta, old_levels, candidates)
    reached = fractions >= target - slack
    any_reached = reached.any(dim=0)
    first = torch.where(any_reached, reached.float().argmax(dim=0), len(ladder) - 1)
    hi = ladder[first]
    kappa, fraction = hi, fractions.gather(0, first[None])[0]
    # kappa = 1 needs no search, nor does a cap that falls short, nor a first hit close enough
    done = (first == 0) | ~any_reached | ((fraction - target).abs() < tolerance)
    lo = hi / 2
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        f_mid = code_change_fraction(fmt, old, delta, old_levels, mid[None])[0]
        active = ~done
        above = f_mid >= target - slack
        # a candidate must still reach the target; keep the one nearest to it
        better = active & above & (f_mid <= fraction)
        kappa = torch.where(better, mid, kappa)
        fraction = torch.where(better, f_mid, fraction)
        done = done | ((f_mid - target).abs() < tolerance)
        hi = torch.where(active & above, mid, hi)
        lo = torch.where(active & ~above, mid, lo)
    still = delta.abs().amax(dim=(-2, -1)) == 0  # nothing to scale: report kappa 1
    return torch.where(still, torch.ones_like(kappa), kappa), fraction


def search_settings(
    rho: float, numel: int, tolerance: float, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(target, slack, tolerance) for a layer of ``numel`` weights, as 0-d device tensors.

    The target share is the nearest whole number of weights, at least one; shares are multiples of
    1/numel, so comparisons keep half a weight (``slack``) to spare.
    """
    target = max(1, round(rho * numel)) / numel
    slack = 0.5 / numel
    values = (target, slack, max(target * tolerance, slack))
    return tuple(torch.full((), v, device=device) for v in values)


def kappa_ladder(cap: float, device: torch.device) -> Tensor:
    """The doubling candidates 1, 2, 4, ... up to the largest power of two within ``cap``."""
    return 2.0 ** torch.arange(int(math.floor(math.log2(cap))) + 1, device=device)


def search_kappa(
    layer: QuantLayer,
    old: Tensor,
    delta: Tensor,
    rho: float,
    cap: float,
    search_steps: int = 5,
    tolerance: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Kappa for one layer (a 0-d device tensor) and the code-change fraction it gives.

    ``old``/``delta``: the layer's weights and optimiser update flattened to (out, fan_in).
    """
    settings = search_settings(rho, old.numel(), tolerance, old.device)
    kappa, fraction = search_kappa_stacked(
        WeightFormat.of(layer),
        old[None],
        delta[None],
        *settings,
        kappa_ladder(cap, old.device).to(old.dtype),
        search_steps,
    )
    return kappa[0], fraction[0]


@dataclass
class _Stack:
    """Layers whose weights stack into one (layers, out, fan_in) tensor."""

    fmt: WeightFormat
    weights: list[torch.nn.Parameter]
    positions: list[int]  # where each layer sits in the caller's layer order

    def flat(self) -> Tensor:
        return torch.stack([w.detach().reshape(w.shape[0], -1) for w in self.weights])

    def write(self, values: Tensor) -> None:
        torch._foreach_copy_(
            self.weights,
            [v.view_as(w) for v, w in zip(values.unbind(0), self.weights, strict=True)],
        )


class LayerStacks:
    """Quantized layers grouped by weight shape and format, for batched level computations.

    Per-stack results (one value per layer) are put back in the original layer order by
    :meth:`in_layer_order`.
    """

    def __init__(self, layers: Sequence[tuple[str, QuantLayer]]) -> None:
        stacks: dict[tuple, _Stack] = {}
        for position, (_, layer) in enumerate(layers):
            shape = (layer.weight.shape[0], layer.weight[0].numel())
            key = (shape, WeightFormat.of(layer))
            stack = stacks.setdefault(key, _Stack(WeightFormat.of(layer), [], []))
            stack.weights.append(layer.weight)
            stack.positions.append(position)
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


class GradientInundation:
    """Wraps a torch optimiser and inundates the updates of quantized weights.

    ``layers`` are the (name, QuantConv2d/QuantLinear) pairs whose weights get GI; their weights
    must be parameters of ``optimizer``. Other parameters (biases, BN, ...) update normally.
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
        compile_mode: str | None = None,
    ) -> None:
        if not 0 < rho < 1:
            raise ZsqError(f"gradient inundation rho={rho} must be in (0, 1), e.g. 1e-3")
        if max_kappa < 1 or warmup_cap < 1:
            raise ZsqError("kappa caps must be >= 1")
        self.optimizer = optimizer
        self.layers = [(n, m) for n, m in layers if m.wbits is not None]
        if not self.layers:
            raise ZsqError("gradient inundation needs at least one quantized weight layer")
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, m in self.layers if id(m.weight) not in owned]
        if missing:
            raise ZsqError(f"layers {missing[:5]} are not optimised by the given optimizer")
        self.rho = rho
        self.warmup = warmup
        self.warmup_cap = warmup_cap
        self.max_kappa = max_kappa
        self.search_steps = search_steps
        self.tolerance = tolerance
        self.stacks = LayerStacks(self.layers)
        self._search: Callable[..., tuple[Tensor, Tensor]] = (
            compiled_function(search_kappa_stacked, compile_mode)
            if compile_mode
            else search_kappa_stacked
        )
        self._settings: dict[tuple, tuple[Tensor, ...]] = {}

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
            settings = search_settings(self.rho, numel, self.tolerance, device)
            self._settings[key] = (*settings, kappa_ladder(self.cap, device))
        return self._settings[key]

    @torch.no_grad()
    def step(self) -> InundationStats:
        sanitize_grads(self.optimizer)
        olds = [stack.flat() for stack in self.stacks]
        self.optimizer.step()
        kappas, fractions = [], []
        for stack, old in zip(self.stacks, olds, strict=True):
            delta = stack.flat() - old
            settings = self._device_settings(stack, old.device)
            kappa, fraction = self._search(stack.fmt, old, delta, *settings, self.search_steps)
            stack.write(old + kappa[:, None, None] * delta)
            kappas.append(kappa)
            fractions.append(fraction)
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
    """Measures, for optimisers without GI, the share of each layer's weight levels that one
    step changes (the paper's Fig. 3b/c counts)."""

    def __init__(self, layers: Sequence[tuple[str, QuantLayer]]) -> None:
        self.layers = [(n, m) for n, m in layers if m.wbits is not None]
        self.stacks = LayerStacks(self.layers)
        self._before: list[Tensor] = []

    @torch.no_grad()
    def before(self) -> None:
        self._before = [weight_levels(s.flat(), s.fmt) for s in self.stacks]

    @torch.no_grad()
    def after(self) -> Tensor:
        fractions = [
            (weight_levels(s.flat(), s.fmt) != old).float().mean(dim=(-2, -1))
            for s, old in zip(self.stacks, self._before, strict=True)
        ]
        return self.stacks.in_layer_order(fractions)
