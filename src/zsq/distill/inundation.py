"""Gradient inundation (AIT, Sec. 4.2): scale each quantized layer's update so that a share rho of
its integer weight codes changes every step.

Works around any torch optimiser: the optimiser steps as usual (its state, e.g. the momentum
buffer, sees the raw gradient, as in the reference), the applied update ``delta`` of every
quantized weight is read off, and the weight is set to ``old + kappa * delta`` with the per-layer
``kappa`` found by search. For SGD with Nesterov momentum ``delta = -lr * (g + m * (m * buf + g))``,
exactly the direction the reference scales.

The search (per layer, all on the device, no host synchronisation):
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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from zsq.errors import ZsqError
from zsq.quant.modules import QuantConv2d, QuantLinear
from zsq.quant.quantizer import qparams_from_range, quantize_codes

QuantLayer = QuantConv2d | QuantLinear
WARMUP_CAP = 128.0
MAX_KAPPA = 2.0**16


@dataclass
class InundationStats:
    """Per-layer kappa used and share of integer codes that changed in one step (device tensors)."""

    kappa: Tensor
    fraction: Tensor


def code_change_fraction(
    layer: QuantLayer, old: Tensor, delta: Tensor, old_codes: Tensor, kappas: Tensor
) -> Tensor:
    """Share of ``layer``'s codes that differ from ``old_codes`` after moving ``old`` by
    ``kappa * delta``, for each kappa in ``kappas`` (ranges recomputed on the moved weights).

    ``old``/``delta``/``old_codes`` are 2-D (out_channels, fan_in). Returns shape (len(kappas),).
    """
    moved = old.unsqueeze(0) + kappas.view(-1, 1, 1) * delta.unsqueeze(0)
    dims = (2,) if layer.w_channel_axis == 0 else (1, 2)
    lo, hi = moved.amin(dim=dims, keepdim=True), moved.amax(dim=dims, keepdim=True)
    scale, zero_point = qparams_from_range(lo, hi, layer.wbits, layer.w_symmetric)
    levels = quantize_codes(moved, scale, zero_point, layer.wbits) + zero_point
    return (levels != old_codes.unsqueeze(0)).float().mean(dim=(1, 2))


def layer_codes(layer: QuantLayer, weight2d: Tensor) -> Tensor:
    """Quantization level ``q + z`` of every weight (its value is ``(q + z) / S``).

    Comparing levels rather than raw codes q keeps a zero-point step (z moves by one when the
    channel's min crosses a half step, shifting every q of the channel without changing any
    value) from counting as a crossing.
    """
    dims = (1,) if layer.w_channel_axis == 0 else (0, 1)
    lo, hi = weight2d.amin(dim=dims, keepdim=True), weight2d.amax(dim=dims, keepdim=True)
    scale, zero_point = qparams_from_range(lo, hi, layer.wbits, layer.w_symmetric)
    return quantize_codes(weight2d, scale, zero_point, layer.wbits) + zero_point


def search_kappa(
    layer: QuantLayer,
    old: Tensor,
    delta: Tensor,
    rho: float,
    cap: float,
    search_steps: int = 5,
    tolerance: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Kappa for one layer (a 0-d device tensor) and the code-change fraction it gives."""
    old_codes = layer_codes(layer, old)
    # the share that "reaches rho": the nearest whole number of weights, at least one
    numel = old.numel()
    target = max(1, round(rho * numel)) / numel
    slack = 0.5 / numel  # fractions are multiples of 1/numel: compare with half a weight to spare
    tolerance = max(target * tolerance, slack)
    n_doublings = int(math.floor(math.log2(cap)))
    ladder = 2.0 ** torch.arange(n_doublings + 1, device=old.device, dtype=old.dtype)
    fractions = code_change_fraction(layer, old, delta, old_codes, ladder)
    reached = fractions >= target - slack
    first = torch.where(
        reached.any(), reached.float().argmax(), torch.full((), n_doublings, device=old.device)
    )
    hi = ladder[first]
    # start from the first doubling that reaches rho (or the cap if none does); kappa = 1 needs
    # no search, nor does a cap that falls short
    kappa, fraction = hi, fractions[first]
    done = (first == 0) | ~reached.any() | ((fraction - target).abs() < tolerance)
    lo = hi / 2
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        f_mid = code_change_fraction(layer, old, delta, old_codes, mid.view(1))[0]
        active = ~done
        close = (f_mid - target).abs() < tolerance
        # a candidate must still reach the target; keep the one nearest to it
        better = active & (f_mid >= target - slack) & (f_mid <= fraction)
        kappa = torch.where(better, mid, kappa)
        fraction = torch.where(better, f_mid, fraction)
        done = done | close
        above = f_mid >= target - slack
        hi = torch.where(active & above, mid, hi)
        lo = torch.where(active & ~above, mid, lo)
    still = delta.abs().amax() == 0  # nothing to scale: report kappa 1
    return torch.where(still, torch.ones_like(kappa), kappa), fraction


class GradientInundation:
    """Wraps a torch optimiser and inundates the updates of quantized weights.

    ``layers`` are the (name, QuantConv2d/QuantLinear) pairs whose weights get GI; their weights
    must be parameters of ``optimizer``. Other parameters (biases, BN, ...) update normally.
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

    @property
    def cap(self) -> float:
        return min(self.warmup_cap, self.max_kappa) if self.warmup else self.max_kappa

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> InundationStats:
        sanitize_grads(self.optimizer)
        weights = [m.weight for _, m in self.layers]
        old = [w.detach().clone() for w in weights]
        self.optimizer.step()
        kappas, fractions = [], []
        for (_, layer), w, w_old in zip(self.layers, weights, old, strict=True):
            old2d = _flat(w_old)
            delta2d = _flat(w) - old2d
            kappa, fraction = search_kappa(
                layer, old2d, delta2d, self.rho, self.cap, self.search_steps, self.tolerance
            )
            w.copy_(w_old + kappa * (w - w_old))
            kappas.append(kappa)
            fractions.append(fraction)
        return InundationStats(torch.stack(kappas), torch.stack(fractions))

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
        self._before: list[Tensor] = []

    @torch.no_grad()
    def before(self) -> None:
        self._before = [layer_codes(m, _flat(m.weight)) for _, m in self.layers]

    @torch.no_grad()
    def after(self) -> Tensor:
        fractions = [
            (layer_codes(m, _flat(m.weight)) != old).float().mean()
            for (_, m), old in zip(self.layers, self._before, strict=True)
        ]
        return torch.stack(fractions)


def _flat(weight: Tensor) -> Tensor:
    return weight.detach().reshape(weight.shape[0], -1)
