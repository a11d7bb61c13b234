"""Fake quantization (paper Eq. 1-4) and module swapping."""

from zsq.quant.model import (
    act_quantizers,
    quant_layers,
    quant_params,
    quantize_model,
    set_act_observer,
    set_observing,
)
from zsq.quant.modules import ActQuantizer, QuantAfter, QuantConv2d, QuantLinear
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
from zsq.quant.spec import LayerQuant, QuantSpec, parse_bits, parse_override

__all__ = [
    "ActQuantizer",
    "LayerQuant",
    "QuantAfter",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "QuantizedTensor",
    "act_quantizers",
    "code_range",
    "dequantize",
    "fake_quantize",
    "parse_bits",
    "parse_override",
    "qparams_from_range",
    "quant_layers",
    "quant_params",
    "quantize_codes",
    "quantize_model",
    "quantize_tensor",
    "set_act_observer",
    "set_observing",
    "tensor_minmax",
]
