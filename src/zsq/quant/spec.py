"""What to quantize and how: a validated config with per-layer overrides by glob pattern."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from zsq.errors import ZsqError
from zsq.quant.modules import OBSERVERS
from zsq.quant.quantizer import MAX_BITS, MIN_BITS, check_bits

Placement = Literal["auto", "input", "reference"]
PLACEMENTS = ("auto", "reference", "input")
OFF_WORDS = ("off", "fp", "fp32", "none", "32")


def parse_bits(value: str | int | None) -> int | None:
    """Parse a CLI/JSON bit width: an integer 2..8, or 'off' for full precision."""
    if value is None or (isinstance(value, str) and value.lower() in OFF_WORDS):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        raise ZsqError(f"bit width {value!r} is not a number; use 2..8 or 'off'") from None
    if not MIN_BITS <= bits <= MAX_BITS:  # worded as this text is written, not as Python's None
        raise ZsqError(f"bit width {bits} is out of range; use 2..8 or 'off'")
    return bits


@dataclass(frozen=True)
class LayerQuant:
    """Resolved settings of one layer (after overrides)."""

    wbits: int | None
    abits: int | None


@dataclass(frozen=True)
class QuantSpec:
    """How ``quantize_model`` quantizes a network.

    ``wbits``/``abits``: 2..8 or None (full precision). ``per_channel``: one weight range per output
    channel (the paper's choice) or one per tensor. ``act_placement``: ``auto`` (default) is the
    reference placement wherever it covers a layer and the layer's input elsewhere (see
    :mod:`zsq.quant.placement`; ``quantized_inputs``, found by ``resolve_placement`` from one
    forward pass, names the layers quantized at their input); ``reference`` quantizes only the
    output of every ReLU/ReLU6 module, as the official GDFQ/AIT code does (a ReLU module called
    at several places, like torchvision's per-block ``relu``, then shares one range; the input
    image and residual sums stay in full precision); ``input`` quantizes the input of every
    quantized layer, image and classifier input included (harsher). ``overrides`` maps glob
    patterns over module names to ``{"wbits": ..., "abits": ...}``; later patterns win, e.g.
    ``{"conv1": {"wbits": 8}, "linear": {"wbits": None, "abits": None}}``.
    """

    wbits: int | None = 4
    abits: int | None = 4
    per_channel: bool = True
    w_symmetric: bool = False
    a_symmetric: bool = False
    act_placement: Placement = "auto"
    act_observer: str = "ema"
    act_momentum: float = 0.9
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized_inputs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.quantized_inputs is not None:  # a list when read back from a report
            object.__setattr__(self, "quantized_inputs", tuple(self.quantized_inputs))
        check_bits(self.wbits)
        check_bits(self.abits)
        if self.act_placement not in PLACEMENTS:
            raise ZsqError(
                f"unknown activation placement {self.act_placement!r}; use one of {PLACEMENTS}"
            )
        if self.act_observer not in OBSERVERS:
            raise ZsqError(f"unknown activation observer {self.act_observer!r}; use {OBSERVERS}")
        for pattern, values in self.overrides.items():
            unknown = set(values) - {"wbits", "abits"}
            if unknown:
                raise ZsqError(
                    f"override {pattern!r} sets unknown keys {sorted(unknown)}; only wbits and "
                    "abits can be overridden per layer"
                )
            for key in ("wbits", "abits"):
                if key in values:
                    check_bits(values[key])

    def for_layer(self, name: str) -> LayerQuant:
        """Bits for the module called ``name``, after applying matching overrides in order."""
        resolved = LayerQuant(self.wbits, self.abits)
        for pattern, values in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                resolved = replace(resolved, **values)
        return resolved

    def quantizes_nothing(self) -> bool:
        """Weights and activations full precision everywhere: no width and no override sets one."""
        widths = [self.wbits, self.abits, *(v for o in self.overrides.values() for v in o.values())]
        return all(bits is None for bits in widths)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def exact_pattern(name: str) -> str:
    """A module name as an override pattern that matches only that module."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def parse_override(text: str) -> tuple[str, dict[str, int | None]]:
    """Parse a CLI override ``PATTERN=W[/A]``: ``conv1=8``, ``linear=off/off``, ``layer1.*=4/8``."""
    pattern, sep, bits = text.partition("=")
    if not sep or not pattern:
        raise ZsqError(
            f"bad layer override {text!r}; write PATTERN=WBITS[/ABITS], e.g. 'conv1=8' or "
            "'linear=off/off'"
        )
    wtext, _, atext = bits.partition("/")
    values: dict[str, int | None] = {"wbits": parse_bits(wtext)}
    if atext:
        values["abits"] = parse_bits(atext)
    return pattern, values
