"""Fake quantization (paper Eq. 1-4), module swapping and quantized attention."""

from zsq.quant.attention import (
    QuantAttention,
    UnitRangeQuantizer,
    attention_maps,
    expose_attention,
    set_keep_attention,
)
from zsq.quant.model import (
    act_quantizers,
    check_layer_patterns,
    prepare_buffers,
    quant_layers,
    quant_params,
    quantize_model,
    quantizer_settings,
    set_act_observer,
    set_observing,
)
from zsq.quant.modules import ActQuantizer, QuantAfter, QuantConv2d, QuantLinear
from zsq.quant.probe import inspect_forward
from zsq.quant.quantizer import (
    QuantizedTensor,
    code_range,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize_codes,
    quantize_tensor,
    tensor_minmax,
)
from zsq.quant.spec import LayerQuant, QuantSpec, exact_pattern, parse_bits, parse_override

__all__ = [
    "ActQuantizer",
    "LayerQuant",
    "QuantAfter",
    "QuantAttention",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "QuantizedTensor",
    "UnitRangeQuantizer",
    "act_quantizers",
    "check_layer_patterns",
    "attention_maps",
    "code_range",
    "dequantize",
    "expose_attention",
    "fake_quantize",
    "inspect_forward",
    "prepare_buffers",
    "exact_pattern",
    "parse_bits",
    "parse_override",
    "qparams_from_range",
    "quant_layers",
    "quant_params",
    "quantize_codes",
    "quantize_model",
    "quantize_tensor",
    "quantizer_settings",
    "set_act_observer",
    "set_keep_attention",
    "set_observing",
    "tensor_minmax",
]
