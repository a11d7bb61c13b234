"""What a bit width costs per layer: weight bytes, BOPs and weight bits, and the user's budget.

The costs are those of the quantized layers only (every ``nn.Conv2d`` / ``nn.Linear``): a budget
constrains what the bit widths change. Bytes are counted as the integer export stores a layer
(codes of 4 bits and below packed two per byte, plus the per-channel parameters, see
``zsq.export.sizes``); BOPs are ``wbits * abits * MACs`` (HAWQ-V3, ZeroQ); the ``wbits`` budget
is the parameter-weighted mean weight width.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zsq.errors import ZsqError
from zsq.export.packing import is_packed
from zsq.export.sizes import FLOAT, ZERO_POINT
from zsq.quant import inspect_forward
from zsq.quant.quantizer import MAX_BITS, MIN_BITS, check_bits

log = logging.getLogger(__name__)

KINDS = ("size", "bops", "wbits")
FP_ACT_BITS = 32  # activation width that ``abits=None`` (full precision) stands for in BOPs
PER_CHANNEL_BYTES = 3 * FLOAT + ZERO_POINT  # scale, range min and max (float32), zero point
TABLE_BITS = (2, 4, 8)  # widths shown per layer in ``cost_table``
UNIFORM_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_COUNT_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BUDGET_RE = re.compile(r"^\s*(\w+)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_BUDGET_FORMS = (
    "use size=1.2MB (B, kB, MB, GB, KiB, MiB), bops=1.5G (a number or k/M/G/T) or wbits=4.0 "
    f"(mean weight bits, {MIN_BITS} to {MAX_BITS})"
)


@dataclass(frozen=True)
class LayerCost:
    """One quantized layer's dimensions, enough to price any bit width."""

    name: str  # module name, as zsq.quant.quant_layers(student) names it
    params: int  # weight elements
    macs: int  # multiply-accumulates of one forward at batch 1
    channels: int  # output channels (one set of quantization parameters each)


@dataclass(frozen=True)
class Budget:
    kind: str  # "size" | "bops" | "wbits"
    value: float  # bytes for size, BOPs for bops, mean bits for wbits
    text: str  # as the user wrote it


def layer_costs(model: nn.Module, image_shape: tuple[int, int, int]) -> list[LayerCost]:
    """Every Conv2d/Linear of ``model`` in module order, MACs from one forward at batch 1.

    The forward runs on zeros in eval mode without gradients, with the RNG forked and activation
    observers paused, so the model's state and the caller's random streams are unchanged.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not layers:
        raise ZsqError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layers, so there is nothing "
            "to allocate bit widths to"
        )
    macs = _traced_macs(model, layers, _check_shape(image_shape))
    costs = []
    for name, module in layers:
        if name not in macs:
            log.warning("layer %r is not called in the forward; its MACs are counted as 0", name)
        weight = module.weight
        costs.append(LayerCost(name, weight.numel(), macs.get(name, 0), int(weight.shape[0])))
    return costs


def _check_shape(image_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(d) for d in image_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ZsqError(
            f"image shape {image_shape!r} must be three positive integers (channels, height, width)"
        )
    return shape


def _traced_macs(
    model: nn.Module, layers: list[tuple[str, nn.Module]], image_shape: tuple[int, ...]
) -> dict[str, int]:
    """MACs per called layer (a layer called twice counts twice)."""
    macs: dict[str, int] = {}

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        macs[name] = macs.get(name, 0) + output.numel() * _macs_per_output(module)

    handles = [
        module.register_forward_hook(lambda m, _i, out, name=name: hook(name, m, out))
        for name, module in layers
    ]
    try:
        inspect_forward(model, image_shape)
    finally:
        for handle in handles:
            handle.remove()
    return macs


def _macs_per_output(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    return module.in_features


def parse_budget(text: str) -> Budget:
    """``size=1.2MB``, ``bops=1.5G`` or ``wbits=4.0`` as a ``Budget``."""
    match = _BUDGET_RE.match(text)
    if match is None:
        raise ZsqError(f"budget {text!r} is not understood; {_BUDGET_FORMS}")
    kind, number, unit = match.group(1).lower(), float(match.group(2)), match.group(3).lower()
    if kind == "size" and unit in _SIZE_UNITS:
        value = number * _SIZE_UNITS[unit]
    elif kind == "bops" and unit in _COUNT_SUFFIXES:
        value = number * _COUNT_SUFFIXES[unit]
    elif kind == "wbits" and unit == "":
        if not MIN_BITS <= number <= MAX_BITS:
            raise ZsqError(
                f"budget {text!r}: the mean weight width must be {MIN_BITS} to {MAX_BITS} bits"
            )
        value = number
    else:
        raise ZsqError(f"budget {text!r} is not understood; {_BUDGET_FORMS}")
    if not math.isfinite(value) or value <= 0:
        raise ZsqError(f"budget {text!r} must be a positive finite amount; {_BUDGET_FORMS}")
    return Budget(kind, value, text.strip())


def _bits(bits: int | None, allow_none: bool = False) -> int | None:
    """``bits`` as a plain int (numpy integers welcome), checked to be 2..8."""
    if bits is None:
        if allow_none:
            return None
        raise ZsqError(f"a weight width is needed here ({MIN_BITS} to {MAX_BITS}), got None")
    if not isinstance(bits, bool):
        try:
            bits = operator.index(bits)
        except TypeError:
            pass  # check_bits names the bad value
    check_bits(bits)
    return bits


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ZsqError(f"unknown cost kind {kind!r}; use one of {', '.join(KINDS)}")


def layer_cost(cost: LayerCost, kind: str, wbits: int, abits: int | None) -> float:
    """One layer's cost at ``wbits``/``abits`` in ``kind``'s unit (bytes, BOPs, bits).

    ``abits=None`` (full-precision activations) counts as 32 bits in BOPs; ``size`` and ``wbits``
    ignore ``abits``.
    """
    _check_kind(kind)
    w = _bits(wbits)
    if kind == "size":
        codes = math.ceil(cost.params / 2) if is_packed(w) else cost.params
        return float(codes + cost.channels * PER_CHANNEL_BYTES)
    if kind == "bops":
        a = _bits(abits, allow_none=True)
        return float(w * (FP_ACT_BITS if a is None else a) * cost.macs)
    return float(w * cost.params)


def budget_limit(budget: Budget, costs: Sequence[LayerCost]) -> float:
    """The budget in ``layer_cost`` units: the sum of layer costs must not exceed it."""
    _check_kind(budget.kind)
    if budget.kind == "wbits":
        return budget.value * sum(c.params for c in costs)
    return float(budget.value)


def total_cost(
    costs: Sequence[LayerCost],
    kind: str,
    wbits: Sequence[int],
    abits: Sequence[int | None],
) -> float:
    """The summed cost of an allocation, layer by layer in order."""
    if not len(costs) == len(wbits) == len(abits):
        raise ZsqError(
            f"{len(costs)} layers but {len(wbits)} weight and {len(abits)} activation widths; "
            "give one of each per layer"
        )
    return sum(layer_cost(c, kind, w, a) for c, w, a in zip(costs, wbits, abits, strict=True))


def budget_of_uniform(
    costs: Sequence[LayerCost], kind: str, wbits: int, abits: int | None
) -> float:
    """Uniform ``wbits``/``abits`` in the budget's own units (bytes, BOPs, or mean bits)."""
    _check_kind(kind)
    if kind == "wbits":
        return float(_bits(wbits))
    n = len(costs)
    return total_cost(costs, kind, [wbits] * n, [abits] * n)


def cost_table(costs: Sequence[LayerCost], abits: int | None = 4) -> str:
    """Markdown: per-layer params, MACs, packed bytes and BOPs; totals at uniform 2..8 bits."""
    a_label = "32 (fp)" if abits is None else str(abits)
    sizes = " | ".join(f"W{b} bytes" for b in TABLE_BITS)
    lines = [
        f"| layer | params | MACs | {sizes} | BOPs W4A{a_label} |",
        "|---|" + "---:|" * (3 + len(TABLE_BITS)),
    ]
    for c in costs:
        row = " | ".join(_int(layer_cost(c, "size", b, abits)) for b in TABLE_BITS)
        bops = _int(layer_cost(c, "bops", 4, abits))
        lines.append(f"| {c.name} | {c.params} | {c.macs} | {row} | {bops} |")
    total_size = " | ".join(_int(budget_of_uniform(costs, "size", b, abits)) for b in TABLE_BITS)
    total_bops = _int(budget_of_uniform(costs, "bops", 4, abits))
    lines.append(
        f"| **total** | {sum(c.params for c in costs)} | {sum(c.macs for c in costs)} | "
        f"{total_size} | {total_bops} |"
    )
    lines += [
        "",
        f"| uniform bits | mean wbits | size bytes (packed) | size MB | BOPs (A{a_label}) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b in UNIFORM_BITS:
        size = budget_of_uniform(costs, "size", b, abits)
        bops = budget_of_uniform(costs, "bops", b, abits)
        mean = budget_of_uniform(costs, "wbits", b, abits)
        lines.append(f"| W{b} | {mean:.2f} | {_int(size)} | {size / 1e6:.4f} | {_int(bops)} |")
    return "\n".join(lines)


def _int(x: float) -> str:
    return str(round(x))
