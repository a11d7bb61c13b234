"""Model size in three storage forms, per quantized layer and in total.

``fp32``: every tensor in float32 (the teacher's size). ``int8``: quantized weights as one byte
per code plus their per-channel parameters as the integer export stores them (scale float32,
zero point int16, the range's min and max float32, LAPQ's offset float32), everything else
float32. ``packed``: the same with codes of 4 bits and below two per byte, as the integer export
writes them. Activation quantizers add a few scalars, counted in ``other``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from zsq.export.packing import is_packed
from zsq.quant import quant_layers

FLOAT, ZERO_POINT = 4, 2  # bytes of a float32 and of an int16 zero point


# per-channel state counted with each layer (its scale and zero point), not again as floats
PER_CHANNEL_KEYS = ("w_range_min", "w_range_max", "w_offset", "w_scale", "w_zero_point")


def size_report(student: nn.Module) -> dict[str, Any]:
    """``{"layers": {name: {...}}, "other": {...}, "total": {...}}``, all in bytes."""
    layers: dict[str, dict[str, Any]] = {}
    counted: set[str] = set()
    for name, layer in quant_layers(student):
        n = layer.weight.numel()
        counted.add(f"{name}.weight")
        if layer.wbits is None:
            layers[name] = {
                "params": n,
                "wbits": None,
                "fp32": n * FLOAT,
                "int8": n * FLOAT,
                "packed": n * FLOAT,
            }
            continue
        channels = layer.weight.shape[0] if layer.w_channel_axis == 0 else 1
        per_channel = channels * (3 * FLOAT + ZERO_POINT)
        if layer.w_offset is not None:
            per_channel += layer.weight.shape[0] * FLOAT
        codes = math.ceil(n / 2) if is_packed(layer.wbits) else n
        layers[name] = {
            "params": n,
            "wbits": layer.wbits,
            "fp32": n * FLOAT,
            "int8": n + per_channel,
            "packed": codes + per_channel,
        }
    other = sum(
        t.numel() * FLOAT
        for key, t in student.state_dict().items()
        if key not in counted and not key.endswith(PER_CHANNEL_KEYS)
    )
    total = {
        form: sum(v[form] for v in layers.values()) + other for form in ("fp32", "int8", "packed")
    }
    return {
        "layers": layers,
        "other": {"fp32": other, "int8": other, "packed": other},
        "total": total,
    }


def size_table(report: dict[str, Any]) -> str:
    """The size report as a markdown table (kB = 1000 bytes)."""
    lines = [
        "| layer | params | bits | FP32 kB | int8 kB | packed kB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["layers"].items():
        lines.append(
            f"| {name} | {row['params']} | {row['wbits'] or 'fp32'} | {row['fp32'] / 1e3:.1f} | "
            f"{row['int8'] / 1e3:.1f} | {row['packed'] / 1e3:.1f} |"
        )
    for label, row in (
        ("other (BN, biases, ranges)", report["other"]),
        ("**total**", report["total"]),
    ):
        kb = " | ".join(f"{row[form] / 1e3:.1f}" for form in ("fp32", "int8", "packed"))
        lines.append(f"| {label} | | | {kb} |")
    return "\n".join(lines)
