"""Fake-quant wrappers swapped in for Conv2d / Linear, and the activation quantizer."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq import distributed
from zsq.errors import ZsqError
from zsq.quant.quantizer import (
    QuantizedTensor,
    check_bits,
    fake_quantize,
    qparams_from_range,
    quantize_codes,
    tensor_minmax,
)

Observer = Literal["ema", "minmax"]
OBSERVERS = ("ema", "minmax")


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a range observer.

    While ``observing`` is on, every forward updates the range from the batch min/max: ``ema``
    keeps ``m*range + (1-m)*batch`` (the reference's momentum 0.9; the first batch initialises it),
    ``minmax`` keeps the running extremes. Turning ``observing`` off freezes the range. The range
    starts at [0, 0], which maps every input into [0, 1e-8] (a zero-width range, widened to
    ``MIN_RANGE``): observe at least one batch before freezing (``calibrate_activations`` or the
    first training epochs do). The observation state lives in buffers, so checkpoints capture
    it; the update has no host synchronisation.
    """

    def __init__(
        self,
        bits: int | None,
        observer: Observer = "ema",
        momentum: float = 0.9,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if observer not in OBSERVERS:
            raise ZsqError(f"unknown activation observer {observer!r}; use one of {OBSERVERS}")
        if not 0.0 <= momentum < 1.0:
            raise ZsqError(f"observer momentum {momentum} must be in [0, 1)")
        self.bits = bits
        self.observer = observer
        self.momentum = momentum
        self.symmetric = symmetric
        self.observing = True
        self.register_buffer("x_min", torch.zeros(()))
        self.register_buffer("x_max", torch.zeros(()))
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.long))
        # a grid learned by reconstruction (scale and zero point, fixed): replaces the range
        self.register_buffer("grid_scale", None)
        self.register_buffer("grid_zero_point", None)
        self.learned: Any = None  # what computes the output while a reconstruction trains it

    def extra_repr(self) -> str:
        return f"bits={self.bits}, observer={self.observer}, observing={self.observing}"

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        batch_min, batch_max = x.detach().min().float(), x.detach().max().float()
        batch_min, batch_max = distributed.global_extremes(batch_min, batch_max)
        first = self.num_observed == 0
        if self.observer == "ema":
            m = self.momentum
            new_min = m * self.x_min + (1 - m) * batch_min
            new_max = m * self.x_max + (1 - m) * batch_max
        else:
            new_min = torch.minimum(self.x_min, batch_min)
            new_max = torch.maximum(self.x_max, batch_max)
        self.x_min.copy_(torch.where(first, batch_min, new_min))
        self.x_max.copy_(torch.where(first, batch_max, new_max))
        self.num_observed += 1

    @torch.no_grad()
    def set_range(
        self, x_min: float | Tensor, x_max: float | Tensor, observing: bool = False
    ) -> None:
        """Set the range from outside (a clip, a loaded export): counted as observed, so an
        EMA that keeps ``observing`` blends new batches into it instead of replacing it."""
        self.x_min.copy_(torch.as_tensor(x_min, dtype=self.x_min.dtype))
        self.x_max.copy_(torch.as_tensor(x_max, dtype=self.x_max.dtype))
        self.num_observed.clamp_(min=1)
        self.observing = observing

    @torch.no_grad()
    def set_grid(self, scale: Tensor | float, zero_point: Tensor | float) -> None:
        """Quantize on this scale and zero point from now on (a learned step, or an export's),
        whatever the observed range; observation stops."""
        ref = self.x_min
        self.grid_scale = torch.as_tensor(scale, dtype=ref.dtype, device=ref.device).clone()
        self.grid_zero_point = torch.as_tensor(zero_point, dtype=ref.dtype, device=ref.device)
        self.grid_zero_point = self.grid_zero_point.clone()
        self.num_observed.clamp_(min=1)  # set from outside: counts as observed
        self.observing = False

    @property
    def has_grid(self) -> bool:
        return self.grid_scale is not None

    def qparams(self) -> tuple[Tensor, Tensor]:
        if self.bits is None:
            raise ZsqError("a full-precision activation quantizer has no scale or zero point")
        if self.grid_scale is not None:
            return self.grid_scale, self.grid_zero_point
        return qparams_from_range(self.x_min, self.x_max, self.bits, self.symmetric)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits is None:
            return x
        if self.learned is not None:
            return self.learned(x)
        if self.observing and self.grid_scale is None:
            self.observe(x)
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale.to(x.dtype), zero_point.to(x.dtype), self.bits)


class _QuantWeightMixin:
    """Weight fake quantization shared by QuantConv2d and QuantLinear.

    The range is the min/max of the current weights (per output channel by default), recomputed
    every forward as in the reference, so codes follow the weights as they train. A post-training
    method may instead fix the range (``set_weight_range``: LAPQ's clipping values, weights beyond
    them are clamped) and add a per-output-channel offset after dequantization
    (``set_weight_offset``: bias correction, which makes the per-channel mean of the weight
    error zero; it is a float shift, so it is kept apart from the integer codes).
    """

    weight: nn.Parameter
    wbits: int | None
    w_channel_axis: int | None
    w_symmetric: bool
    act_quant: ActQuantizer | None

    def _init_quant(
        self,
        wbits: int | None,
        per_channel: bool,
        w_symmetric: bool,
        act_quant: ActQuantizer | None,
    ) -> None:
        check_bits(wbits)
        self.wbits = wbits
        self.w_channel_axis = 0 if per_channel else None
        self.w_symmetric = w_symmetric
        self.act_quant = act_quant
        # Optional post-training state (None: the reference's behaviour); buffers, so a
        # student's state_dict carries them once set.
        self.register_buffer("w_range_min", None)
        self.register_buffer("w_range_max", None)
        self.register_buffer("w_offset", None)
        # a grid learned by reconstruction (per-channel scale and zero point, fixed)
        self.register_buffer("w_scale", None)
        self.register_buffer("w_zero_point", None)
        self.weight_rounding: Any = None  # computes the weight while a reconstruction trains it

    def set_weight_range(self, wmin: Tensor | float, wmax: Tensor | float) -> None:
        """Fix the weight range (e.g. a clipping value) instead of the weights' own min/max."""
        ref = self.weight.detach()
        self.w_range_min = torch.as_tensor(wmin, dtype=ref.dtype, device=ref.device).clone()
        self.w_range_max = torch.as_tensor(wmax, dtype=ref.dtype, device=ref.device).clone()

    def set_weight_grid(self, scale: Tensor, zero_point: Tensor) -> None:
        """Quantize the weights on this scale and zero point (a learned grid, e.g. Genie's)
        instead of a range: the codes are ``round(S * w - z)`` on it."""
        ref = self.weight.detach()
        self.w_scale = torch.as_tensor(scale, dtype=ref.dtype, device=ref.device).clone()
        self.w_zero_point = torch.as_tensor(zero_point, dtype=ref.dtype, device=ref.device).clone()

    def set_weight_offset(self, offset: Tensor | None) -> None:
        """A per-output-channel shift added after fake quantization (None removes it)."""
        if offset is None:
            self.w_offset = None
            return
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        self.w_offset = offset.detach().to(self.weight).reshape(shape).clone()

    def weight_qparams(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scale and zero point for ``weight`` (default: the current weights, or the fixed
        range when one is set)."""
        w = self.weight if weight is None else weight
        if self.wbits is None:
            raise ZsqError("a full-precision layer has no weight scale or zero point")
        with torch.no_grad():
            if self.w_scale is not None:
                return self.w_scale, self.w_zero_point
            if weight is None and self.w_range_min is not None:
                wmin, wmax = self.w_range_min, self.w_range_max
            else:
                wmin, wmax = tensor_minmax(w, self.w_channel_axis)
            return qparams_from_range(wmin, wmax, self.wbits, self.w_symmetric)

    def quantized_weight(self) -> QuantizedTensor:
        """Integer weight codes with their scale and zero point (for export and analysis); a
        bias-correction offset (``w_offset``) is not part of them."""
        scale, zero_point = self.weight_qparams()
        codes = quantize_codes(self.weight.detach(), scale, zero_point, self.wbits)
        return QuantizedTensor(codes, scale, zero_point, self.wbits)

    def fake_quant_weight(self) -> Tensor:
        if self.wbits is None:
            return self.weight
        if self.weight_rounding is not None:
            return self.weight_rounding(self.weight)
        scale, zero_point = self.weight_qparams()
        weight = fake_quantize(self.weight, scale, zero_point, self.wbits)
        return weight if self.w_offset is None else weight + self.w_offset

    def quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """Conv2d whose weights (and optionally input) are fake-quantized."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        wbits: int | None,
        *,
        per_channel: bool = True,
        w_symmetric: bool = False,
        act_quant: ActQuantizer | None = None,
    ) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        q._init_quant(wbits, per_channel, w_symmetric, act_quant)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.fake_quant_weight(), self.bias)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """Linear whose weights (and optionally input) are fake-quantized."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        wbits: int | None,
        *,
        per_channel: bool = True,
        w_symmetric: bool = False,
        act_quant: ActQuantizer | None = None,
    ) -> QuantLinear:
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        q._init_quant(wbits, per_channel, w_symmetric, act_quant)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.fake_quant_weight(), self.bias)


class QuantAfter(nn.Module):
    """Runs ``module`` (a ReLU/ReLU6) and quantizes its output: the reference placement."""

    def __init__(self, module: nn.Module, act_quant: ActQuantizer) -> None:
        super().__init__()
        self.module = module
        self.act_quant = act_quant

    def forward(self, x: Tensor) -> Tensor:
        return self.act_quant(self.module(x))


QuantLayer = QuantConv2d | QuantLinear
