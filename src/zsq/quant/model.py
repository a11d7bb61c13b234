"""``quantize_model``: turn any nn.Module into a fake-quantized student by module swapping.

No graph tracing: every ``nn.Conv2d`` / ``nn.Linear`` child is replaced by its Quant* wrapper,
and every timm ``Attention`` by a :class:`~zsq.quant.attention.QuantAttention`, so models with
data-dependent control flow work unchanged. The input model is never mutated.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from zsq.errors import ConfigError, ZsqError
from zsq.quant.attention import QuantAttention, UnitRangeQuantizer, timm_attention_class
from zsq.quant.modules import ActQuantizer, QuantAfter, QuantConv2d, QuantLayer, QuantLinear
from zsq.quant.placement import resolve_placement
from zsq.quant.spec import QuantSpec

log = logging.getLogger(__name__)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def quantize_model(
    model: nn.Module, spec: QuantSpec | None = None, image_shape: Sequence[int] | None = None
) -> nn.Module:
    """Return a deep copy of ``model`` with fake quantization as ``spec`` says.

    ``image_shape`` (channels, height, width): what the model takes, for the ``auto``
    activation placement to find which layer inputs no ReLU quantizer covers (one forward
    pass); not needed with a spec already resolved (``resolve_placement``), another placement,
    or no activation bits.

    BatchNorm is kept unfolded and in full precision. Activation ranges start unobserved and
    observing: run calibration batches (or the first training epochs), then
    ``set_observing(student, False)`` to freeze them.

    Transformers (a model holding timm ``Attention`` modules): each attention module becomes a
    ``QuantAttention`` whose two matmuls get quantized inputs (``NAME.q_quant``, ``.k_quant``,
    ``.v_quant``: per tensor, bits from ``spec.for_layer`` of those names; ``.attn_quant``: the
    softmax output on [0, 1]); LayerNorm, softmax and GELU stay float. With the ``reference``
    placement, every nn.Linear (qkv, proj, fc1, fc2, head) also gets its input quantized, as
    ``input`` placement does, while the image entering the patch embedding stays float, as the
    reference placement keeps a CNN's image. Why: the reference placement quantizes ReLU
    outputs, and a ViT has none (GELU, and LayerNorm before every Linear), so read literally it
    would quantize nothing but the attention matmuls and ``QuantSpec(wbits=4, abits=4)`` would
    leave most activations float; every Linear input is where a transformer's integer kernels
    take 8/4-bit operands. ``input`` placement quantizes the image too.
    """
    spec = _resolved(model, spec or QuantSpec(), image_shape)
    student = copy.deepcopy(model)
    n_attention = _swap_attention(student, spec, prefix="")
    linear_inputs = n_attention > 0 and spec.act_placement == "reference"
    n_layers = _swap_layers(student, spec, prefix="", linear_inputs=linear_inputs)
    if n_layers == 0:
        raise ZsqError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layers to quantize; zsq "
            "quantizes modules of those types"
        )
    if n_attention:
        log.info("quantized %d attention modules (both matmuls)", n_attention)
    _warn_unswapped_attention(student)
    if spec.act_placement in ("reference", "auto"):
        n_acts = _wrap_activations(student, spec, prefix="")
        if (
            n_acts == 0
            and spec.abits is not None
            and spec.act_placement == "reference"
            and not linear_inputs
        ):
            raise ConfigError(
                f"{type(model).__name__} has no nn.ReLU/nn.ReLU6 modules (functional relu?), so "
                "the reference activation placement would quantize no activation; use "
                "«act_placement» input"
            )
    device = _single_device(model)
    if device is not None:
        student.to(device)  # the new quantizers' buffers start on the CPU
    return student


def _resolved(model: nn.Module, spec: QuantSpec, image_shape: Sequence[int] | None) -> QuantSpec:
    if spec.act_placement != "auto" or spec.quantized_inputs is not None:
        return spec
    if not _has_act_bits(spec):
        return replace(spec, quantized_inputs=())
    if image_shape is None:
        raise ConfigError(
            "the auto activation placement needs the model's input shape: pass image_shape "
            "(channels, height, width), or «act_placement» reference or input"
        )
    return resolve_placement(model, spec, image_shape)


def _has_act_bits(spec: QuantSpec) -> bool:
    return spec.abits is not None or any(
        values.get("abits") is not None for values in spec.overrides.values()
    )


def check_layer_patterns(model: nn.Module, spec: QuantSpec) -> None:
    """Every per-layer override pattern must match a layer it can change (else it does nothing).

    Weight bits apply to Conv2d/Linear layers; with the reference placement activation bits
    apply to ReLU/ReLU6 modules too.
    """
    types = (nn.Conv2d, nn.Linear) + (_ACTIVATIONS if spec.act_placement != "input" else ())
    names = [name for name, module in model.named_modules() if isinstance(module, types)]
    for pattern in spec.overrides:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:3]) + (f", ..., {names[-1]}" if len(names) > 3 else "")
            raise ConfigError(
                f"layer pattern {pattern!r} («quant overrides|quant.overrides») matches no "
                f"layer of {type(model).__name__}; patterns are globs over module names such as "
                f"{shown}",
            )


def _single_device(model: nn.Module) -> torch.device | None:
    """The device of all of ``model``'s tensors, or None (none, or spread over several)."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def _make_act_quant(spec: QuantSpec, bits: int | None) -> ActQuantizer | None:
    if bits is None:
        return None
    return ActQuantizer(bits, spec.act_observer, spec.act_momentum, spec.a_symmetric)


def _swap_attention(module: nn.Module, spec: QuantSpec, prefix: str) -> int:
    """Replace every timm ``Attention`` (exact class: subclasses may compute otherwise)."""
    attention_cls = timm_attention_class()
    if attention_cls is None:
        return 0
    count = 0
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        if type(child) is attention_cls:
            setattr(module, child_name, _quant_attention(child, name, spec))
            count += 1
        else:
            count += _swap_attention(child, spec, prefix=f"{name}.")
    return count


def _quant_attention(attn: nn.Module, name: str, spec: QuantSpec) -> QuantAttention:
    def quantizer(part: str) -> ActQuantizer | None:
        return _make_act_quant(spec, spec.for_layer(f"{name}.{part}").abits)

    prob_bits = spec.for_layer(f"{name}.attn_quant").abits
    return QuantAttention.from_timm(
        attn,
        q_quant=quantizer("q_quant"),
        k_quant=quantizer("k_quant"),
        v_quant=quantizer("v_quant"),
        attn_quant=None if prob_bits is None else UnitRangeQuantizer(prob_bits),
    )


def _warn_unswapped_attention(model: nn.Module) -> None:
    others = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__name__.endswith("Attention") and not isinstance(m, QuantAttention)
        }
    )
    if others:
        log.warning(
            "attention modules of type %s are not timm's vision_transformer.Attention: their "
            "Linears are quantized but their matmuls stay in full precision",
            ", ".join(others),
        )


def _swap_layers(module: nn.Module, spec: QuantSpec, prefix: str, linear_inputs: bool) -> int:
    count = 0
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Conv2d | nn.Linear) and not isinstance(
            child, QuantConv2d | QuantLinear
        ):
            setattr(module, child_name, _quant_layer(child, name, spec, linear_inputs))
            count += 1
        else:
            count += _swap_layers(child, spec, f"{name}.", linear_inputs)
    return count


def _quant_layer(
    layer: nn.Conv2d | nn.Linear, name: str, spec: QuantSpec, linear_inputs: bool = False
) -> QuantLayer:
    """The Quant* wrapper; its input is quantized with ``input`` placement, or when
    ``linear_inputs`` (a transformer under ``reference`` placement) and it is a Linear."""
    bits = spec.for_layer(name)
    quant_input = (
        spec.act_placement == "input"
        or (linear_inputs and isinstance(layer, nn.Linear))
        or (spec.act_placement == "auto" and name in (spec.quantized_inputs or ()))
    )
    act_quant = _make_act_quant(spec, bits.abits) if quant_input else None
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


def prepare_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Register the optional buffers a saved quantized model has (a post-training method's
    fixed range and offset, a reconstruction's grids), so that ``load_state_dict`` takes them."""
    for name, layer in quant_layers(model):
        if f"{name}.w_range_min" in state:
            layer.set_weight_range(state[f"{name}.w_range_min"], state[f"{name}.w_range_max"])
        if f"{name}.w_offset" in state:
            layer.set_weight_offset(state[f"{name}.w_offset"])
        if f"{name}.w_scale" in state:
            layer.set_weight_grid(state[f"{name}.w_scale"], state[f"{name}.w_zero_point"])
    for name, quantizer in act_quantizers(model):
        if f"{name}.grid_scale" in state:
            quantizer.set_grid(state[f"{name}.grid_scale"], state[f"{name}.grid_zero_point"])


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


def quantizer_settings(model: nn.Module) -> dict[str, list]:
    """How each quantizer of ``model`` quantizes (bits, granularity, symmetry, observer), by
    module name: what a checkpoint's student must share with the student it is loaded into,
    since none of it is in the state dict."""
    settings: dict[str, list] = {}
    for name, layer in quant_layers(model):
        settings[name] = ["weight", layer.wbits, layer.w_channel_axis, layer.w_symmetric]
    for name, aq in act_quantizers(model):
        settings[name] = [type(aq).__name__, aq.bits, aq.observer, aq.momentum, aq.symmetric]
    return settings


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
