"""``quantize_model``: turn any nn.Module into a fake-quantized student by module swapping.

No graph tracing: every ``nn.Conv2d`` / ``nn.Linear`` child is replaced by its Quant* wrapper,
so models with data-dependent control flow work unchanged. The input model is never mutated.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from zsq.errors import ZsqError
from zsq.quant.modules import ActQuantizer, QuantAfter, QuantConv2d, QuantLayer, QuantLinear
from zsq.quant.spec import QuantSpec

log = logging.getLogger(__name__)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def quantize_model(model: nn.Module, spec: QuantSpec | None = None) -> nn.Module:
    """Return a deep copy of ``model`` with fake quantization as ``spec`` says.

    BatchNorm is kept unfolded and in full precision. Activation ranges start unobserved and
    observing: run calibration batches (or the first training epochs), then
    ``set_observing(student, False)`` to freeze them.
    """
    spec = spec or QuantSpec()
    student = copy.deepcopy(model)
    n_layers = _swap_layers(student, spec, prefix="")
    if n_layers == 0:
        raise ZsqError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layers to quantize; zsq "
            "quantizes modules of those types"
        )
    if spec.act_placement == "reference":
        n_acts = _wrap_activations(student, spec, prefix="")
        if n_acts == 0 and spec.abits is not None:
            raise ZsqError(
                f"{type(model).__name__} has no nn.ReLU/nn.ReLU6 modules (functional relu?), so "
                "the reference activation placement would quantize no activation; use "
                "--act-placement input (act_placement='input')"
            )
    return student


def _make_act_quant(spec: QuantSpec, bits: int | None) -> ActQuantizer | None:
    if bits is None:
        return None
    return ActQuantizer(bits, spec.act_observer, spec.act_momentum, spec.a_symmetric)


def _swap_layers(module: nn.Module, spec: QuantSpec, prefix: str) -> int:
    count = 0
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Conv2d | nn.Linear) and not isinstance(
            child, QuantConv2d | QuantLinear
        ):
            setattr(module, child_name, _quant_layer(child, name, spec))
            count += 1
        else:
            count += _swap_layers(child, spec, prefix=f"{name}.")
    return count


def _quant_layer(layer: nn.Conv2d | nn.Linear, name: str, spec: QuantSpec) -> QuantLayer:
    bits = spec.for_layer(name)
    act_quant = _make_act_quant(spec, bits.abits) if spec.act_placement == "input" else None
    wrapper = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    return wrapper.from_float(
        layer,
        bits.wbits,
        per_channel=spec.per_channel,
        w_symmetric=spec.w_symmetric,
        act_quant=act_quant,
    )


def _wrap_activations(module: nn.Module, spec: QuantSpec, prefix: str) -> int:
    count = 0
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        if isinstance(child, _ACTIVATIONS):
            act_quant = _make_act_quant(spec, spec.for_layer(name).abits)
            if act_quant is not None:
                setattr(module, child_name, QuantAfter(child, act_quant))
                count += 1
        elif not isinstance(child, QuantAfter):
            count += _wrap_activations(child, spec, prefix=f"{name}.")
    return count


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    """(name, layer) of every fake-quant Conv2d/Linear, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantConv2d | QuantLinear):
            yield name, module


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    """(name, quantizer) of every activation quantizer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ActQuantizer):
            yield name, module


def set_observing(model: nn.Module, observing: bool) -> None:
    """Start or stop updating activation ranges. Freezing checks every range was observed."""
    for name, aq in act_quantizers(model):
        if not observing and aq.bits is not None and int(aq.num_observed) == 0:
            raise ZsqError(
                f"activation quantizer {name!r} never saw data; calibrate (run batches through "
                "the student) before freezing ranges"
            )
        aq.observing = observing


def set_act_observer(model: nn.Module, observer: str) -> None:
    """Switch every activation observer between 'ema' and 'minmax'."""
    for _, aq in act_quantizers(model):
        aq.observer = observer


@torch.no_grad()
def quant_params(model: nn.Module) -> dict[str, Any]:
    """Per-layer bits, scales and zero points, JSON-ready (the content of ``quant.json``)."""
    layers: dict[str, Any] = {}
    for name, layer in quant_layers(model):
        entry: dict[str, Any] = {"type": type(layer).__name__, "wbits": layer.wbits}
        if layer.wbits is not None:
            scale, zero_point = layer.weight_qparams()
            entry["weight_scale"] = scale.flatten().tolist()
            entry["weight_zero_point"] = zero_point.flatten().tolist()
            entry["weight_granularity"] = "channel" if layer.w_channel_axis == 0 else "tensor"
        layers[name] = entry
    acts: dict[str, Any] = {}
    for name, aq in act_quantizers(model):
        entry = {"abits": aq.bits, "min": float(aq.x_min), "max": float(aq.x_max)}
        if aq.bits is not None:
            scale, zero_point = aq.qparams()
            entry.update(scale=float(scale), zero_point=float(zero_point))
        acts[name] = entry
    return {"layers": layers, "activations": acts}
