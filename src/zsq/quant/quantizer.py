"""Uniform fake quantization exactly as the AIT paper defines it (Eq. 1-4, inherited from ZeroQ).

Asymmetric, signed integer codes::

    S = (2^n - 1) / (max - min)                 (Eq. 2)
    z = round(S * min) + 2^(n-1)                (Eq. 3, integral zero point)
    q = clamp(round(S * x - z), -2^(n-1), 2^(n-1) - 1)   (Eq. 1)
    x' = (q + z) / S                            (Eq. 4)

The symmetric option uses ``S = (2^(n-1) - 1) / max|x|`` and ``z = 0``. A range narrower than
``MIN_RANGE`` (a constant tensor) is first extended to include zero, so a constant c is represented
exactly with a finite S (the reference's bare 1e-8 clamp gives S ~ 1e9 and codes that depend on
float32 rounding); an all-zero tensor falls back to width ``MIN_RANGE``.
Gradients pass straight through (identity, no clipping mask), as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from zsq.errors import ZsqError

MIN_BITS, MAX_BITS = 2, 8
MIN_RANGE = 1e-8


def code_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed integer code of an ``bits``-bit quantizer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def tensor_minmax(x: Tensor, channel_axis: int | None) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` overall (``channel_axis=None``) or per slice along ``channel_axis``.

    Per-channel results keep singleton dims so they broadcast against ``x``.
    """
    if channel_axis is None:
        return x.min(), x.max()
    dims = [d for d in range(x.dim()) if d != channel_axis % x.dim()]
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def qparams_from_range(
    xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale S and zero point z (Eq. 2-3) for the range [xmin, xmax]."""
    if symmetric:
        bound = torch.maximum(xmin.abs(), xmax.abs()).clamp(min=MIN_RANGE)
        scale = (2 ** (bits - 1) - 1) / bound
        return scale, torch.zeros_like(scale)
    degenerate = (xmax - xmin) < MIN_RANGE
    xmin = torch.where(degenerate, xmin.clamp(max=0), xmin)
    xmax = torch.where(degenerate, xmax.clamp(min=0), xmax)
    scale = (2**bits - 1) / (xmax - xmin).clamp(min=MIN_RANGE)
    zero_point = torch.round(scale * xmin) + 2 ** (bits - 1)
    return scale, zero_point


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Integer codes q of Eq. 1 (as a float tensor holding integers)."""
    qmin, qmax = code_range(bits)
    return torch.clamp(torch.round(scale * x - zero_point), qmin, qmax)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Real value represented by integer codes (Eq. 4)."""
    return (codes + zero_point) / scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize ``x`` with a straight-through (identity) gradient.

    The value is exactly the dequantized code (``xq + (x - x)``, and ``x - x`` is exactly 0),
    so a student rebuilt from its integer codes computes the same numbers bit for bit; the
    gradient reaches ``x`` unchanged through the zero term.
    """
    with torch.no_grad():
        xq = dequantize(quantize_codes(x, scale, zero_point, bits), scale, zero_point)
    return xq + (x - x.detach())


@dataclass
class QuantizedTensor:
    """Integer codes with the scale and zero point that map them back: ``x' = (codes + z) / S``."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    bits: int

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point)


def quantize_tensor(
    x: Tensor, bits: int, channel_axis: int | None = 0, symmetric: bool = False
) -> QuantizedTensor:
    """Quantize ``x`` with its own min/max range (per slice along ``channel_axis``, or whole)."""
    check_bits(bits)
    with torch.no_grad():
        xmin, xmax = tensor_minmax(x, channel_axis)
        scale, zero_point = qparams_from_range(xmin, xmax, bits, symmetric)
        return QuantizedTensor(quantize_codes(x, scale, zero_point, bits), scale, zero_point, bits)


def check_bits(bits: int | None) -> None:
    """Reject a bit width outside 2..8 (``None`` means full precision)."""
    if bits is None:
        return
    choices = f"use an integer from {MIN_BITS} to {MAX_BITS}, or None for full precision"
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ZsqError(f"bit width {bits!r} is not an integer; {choices} (the CLI's 'off')")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ZsqError(f"bit width {bits} is out of range; {choices}")
