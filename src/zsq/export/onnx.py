"""ONNX export with QuantizeLinear/DequantizeLinear, run by onnxruntime.

The student is copied into an export form, then exported with torch's ONNX exporter
(``torch.onnx.export(..., dynamo=True)``, opset 19):

- a quantized weight becomes an integer initializer (its codes ``q``) and a per-channel
  ``DequantizeLinear`` (scale ``1/S``, zero point ``-z``: ONNX computes ``(q - zp) * scale``,
  paper Eq. 4 computes ``(q + z) / S``), followed by an ``Add`` of LAPQ's bias-correction offset
  when there is one;
- an activation quantizer becomes ``QuantizeLinear -> Clip -> DequantizeLinear`` (per tensor),
  where the student has it (after the ReLUs, or at each layer's input).

Bits below 8 keep their exact range with int8 codes clipped to ``[-2^(b-1), 2^(b-1) - 1]`` in the
integer domain (``Clip`` on the int8 tensor; no ``Clip`` at 8 bits, where int8 saturation is the
range). ONNX's 4-bit types would cover only 4 bits, not 2, 3, 5, 6 or 7, and run in fewer
runtimes. A range that does not contain 0 needs a zero point outside int8: uint8 codes with a
shift then (see ``onnx_zero_point``). Opset 19: onnxruntime 1.32's QDQ graph optimisations
reject some opset-21 QuantizeLinear nodes they create themselves.
The model takes the student's normalised float NCHW input and returns its logits.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.export._files import check_targets, staged
from zsq.export.finite import check_finite
from zsq.io import is_utf8
from zsq.quant import ActQuantizer, code_range
from zsq.quant.modules import QuantConv2d, QuantLinear

log = logging.getLogger(__name__)

OPSET = 19
EXTRA_HINT = "install the onnx extra: pip install 'zsq[onnx]'"


def require_onnx() -> None:
    """A one-line error naming the extra when onnx, onnxruntime or onnxscript is missing."""
    import importlib.util

    missing = [
        m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise ZsqError(f"ONNX export needs {', '.join(missing)}; {EXTRA_HINT}")


# --- the two operations, as torch custom ops with their ONNX translation ---------------------
@torch.library.custom_op("zsq::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> Tensor:
    """ONNX's QuantizeLinear -> Clip -> DequantizeLinear, per tensor, in torch."""
    q = torch.clamp(torch.round(x / scale) + zero_point.float(), qmin, qmax)
    return (q - zero_point.float()) * scale


@quantize_dequantize.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("zsq::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """ONNX's DequantizeLinear along axis 0, in torch."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@dequantize_per_channel.register_fake
def _(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _translations() -> dict[Any, Any]:
    from onnxscript import opset19 as op

    def qdq(x, scale, zero_point, qmin: int, qmax: int):
        q = op.QuantizeLinear(x, scale, zero_point)
        if (qmin, qmax) not in ((-128, 127), (0, 255)):  # 8 bits: the type's saturation
            q = op.Clip(q, op.CastLike(qmin, q), op.CastLike(qmax, q))
        return op.DequantizeLinear(q, scale, zero_point)

    def dq(codes, scale, zero_point):
        return op.DequantizeLinear(codes, scale, zero_point, axis=0)

    return {
        torch.ops.zsq.quantize_dequantize.default: qdq,
        torch.ops.zsq.dequantize_per_channel.default: dq,
    }


# --- the export form of the student ------------------------------------------------------------
def onnx_zero_point(z: Tensor, bits: int) -> tuple[Tensor, Tensor] | None:
    """ONNX zero point(s) and code shift(s) for paper zero point(s) ``z``.

    ONNX dequantizes ``(y - zp) * scale``; with ``scale = 1/S`` the codes ``y = q`` and
    ``zp = -z`` reproduce ``(q + z) / S`` in int8 when ``-z`` fits int8 (every range that
    contains 0). Otherwise uint8 codes ``y = q + c`` with ``zp = c - z``, ``c = max(2^(b-1), z)``,
    which fit for every width below 8. None: no exact 8-bit Q/DQ form exists (an 8-bit range
    far from 0).
    """
    z = z.round()
    if int((-z).min()) >= -128 and int((-z).max()) <= 127:
        return (-z).to(torch.int8), torch.zeros_like(z)
    if bits >= 8:
        return None
    shift = torch.clamp(z, min=2 ** (bits - 1))
    return (shift - z).to(torch.uint8), shift


class OnnxActQuant(nn.Module):
    """An activation quantizer as QuantizeLinear -> Clip -> DequantizeLinear."""

    def __init__(self, aq: ActQuantizer) -> None:
        super().__init__()
        scale, z = aq.qparams()
        found = onnx_zero_point(z.reshape(()), aq.bits)
        if found is None:
            raise ZsqError(
                f"an 8-bit activation range [{float(aq.x_min):.4g}, {float(aq.x_max):.4g}] "
                "that does not contain 0 has no exact ONNX Q/DQ form; quantize it with fewer bits"
            )
        zero_point, shift = found
        self.register_buffer("scale", (1.0 / scale).float().reshape(()))
        self.register_buffer("zero_point", zero_point)
        qmin, qmax = code_range(aq.bits)
        self.qmin, self.qmax = qmin + int(shift), qmax + int(shift)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.zsq.quantize_dequantize(
            x, self.scale, self.zero_point, self.qmin, self.qmax
        )


class _OnnxWeight(nn.Module):
    """Integer weight codes and their per-channel DequantizeLinear (plus LAPQ's offset); the
    dequantized float weight where no exact integer form exists (see onnx_zero_point)."""

    def _init_weight(self, layer: QuantConv2d | QuantLinear, name: str) -> None:
        scale, z = layer.weight_qparams()
        codes = layer.quantized_weight().codes
        channels = layer.weight.shape[0]
        z = z.reshape(-1).expand(channels).contiguous()
        found = onnx_zero_point(z, layer.wbits)
        self.register_buffer("codes", None)
        self.register_buffer("w_float", None)
        if found is None:
            log.warning(
                "%s: an 8-bit weight range without 0 has no exact int8 Q/DQ form; its "
                "dequantized weights are stored as float32",
                name,
            )
            self.w_float = layer.fake_quant_weight().detach().clone()
        else:
            zero_point, shift = found
            view = (-1,) + (1,) * (codes.dim() - 1)
            self.codes = (codes + shift.reshape(view)).to(zero_point.dtype)
            self.register_buffer("w_zero_point", zero_point)
            step = (1.0 / scale).float().reshape(-1).expand(channels).contiguous()
            self.register_buffer("w_scale", step)
        offset = None if layer.w_offset is None else layer.w_offset.detach().clone()
        self.register_buffer("w_offset", None if self.w_float is not None else offset)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        aq = layer.act_quant
        self.act_quant = None if aq is None or aq.bits is None else OnnxActQuant(aq)

    def weight_value(self) -> Tensor:
        if self.w_float is not None:
            return self.w_float
        w = torch.ops.zsq.dequantize_per_channel(self.codes, self.w_scale, self.w_zero_point)
        return w if self.w_offset is None else w + self.w_offset

    def quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)


class OnnxConv2d(_OnnxWeight):
    def __init__(self, layer: QuantConv2d, name: str = "") -> None:
        super().__init__()
        self._init_weight(layer, name)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        if layer.padding_mode != "zeros":
            raise ZsqError(
                f"ONNX export handles zero-padded convolutions only, not {layer.padding_mode}"
            )

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            self.quant_input(x),
            self.weight_value(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class OnnxLinear(_OnnxWeight):
    def __init__(self, layer: QuantLinear, name: str = "") -> None:
        super().__init__()
        self._init_weight(layer, name)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.weight_value(), self.bias)


class _FloatInput(nn.Module):
    """A full-precision layer that still quantizes its input (act placement ``input``)."""

    def __init__(self, layer: QuantConv2d | QuantLinear) -> None:
        super().__init__()
        self.act_quant = OnnxActQuant(layer.act_quant)
        self.layer = _float_copy(layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.act_quant(x))


def _float_copy(layer: QuantConv2d | QuantLinear) -> nn.Module:
    """The plain Conv2d/Linear with the layer's float weights."""
    if isinstance(layer, QuantConv2d):
        plain: nn.Module = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
        )
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    state = {"weight": layer.weight.detach()}
    if layer.bias is not None:
        state["bias"] = layer.bias.detach()
    plain.load_state_dict(state)
    return plain


def onnx_form(student: nn.Module) -> nn.Module:
    """A copy of ``student`` whose quantizers are the ONNX Q/DQ operations (eval mode)."""
    form = copy.deepcopy(student).eval()
    _swap(form, prefix="")
    return form


def _swap(module: nn.Module, prefix: str) -> None:
    for name, child in list(module.named_children()):
        full = prefix + name
        if isinstance(child, QuantConv2d | QuantLinear):
            setattr(module, name, _export_layer(child, full))
        elif isinstance(child, ActQuantizer):
            setattr(module, name, OnnxActQuant(child) if child.bits is not None else nn.Identity())
        else:
            _swap(child, prefix=full + ".")


def _export_layer(layer: QuantConv2d | QuantLinear, name: str) -> nn.Module:
    if layer.wbits is not None:
        kind = OnnxConv2d if isinstance(layer, QuantConv2d) else OnnxLinear
        return kind(layer, name)
    if layer.act_quant is not None and layer.act_quant.bits is not None:
        return _FloatInput(layer)
    return _float_copy(layer)


@torch.no_grad()
def export_onnx(
    student: nn.Module,
    path: str | Path,
    image_shape: tuple[int, int, int],
    model_info: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``student`` as ONNX Q/DQ to ``path`` (checked by ``onnx.checker``); returns it.
    ``model_info`` (normalisation, classes, ...) goes into the model's metadata as ``zsq.*``.
    An existing ``path`` is an error unless ``overwrite``."""
    require_onnx()
    import json

    import onnx

    for name in ("onnx_ir", "onnxscript"):  # their per-pass INFO lines are not the user's
        logging.getLogger(name).setLevel(logging.WARNING)

    path = Path(path)
    check_targets([path], overwrite=overwrite)
    check_finite(student)
    form = onnx_form(student).cpu()
    example = torch.zeros(2, *image_shape)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        form,
        (example,),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={_input_name(form): {0: batch}},
        dynamo=True,
        opset_version=OPSET,
        custom_translation_table=_translations(),
        verbose=False,
    )
    with staged([path], overwrite=overwrite) as (tmp,):
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        _strip_debug_info(model.graph)
        info = {"image_shape": list(image_shape), **(model_info or {})}
        info[DIGEST_KEY] = graph_sha256(model.graph)
        for key, value in info.items():
            model.metadata_props.add(key=f"zsq.{key}", value=json.dumps(value))
        onnx.save(model, str(tmp))
        onnx.checker.check_model(model, full_check=True)  # the proto: any path's bytes
    return path


DIGEST_KEY = "graph_sha256"


def graph_sha256(graph: Any) -> str:
    """sha256 of the graph as protobuf writes it deterministically: every node, attribute and
    initializer (weights, codes, scales, zero points), so a damaged or edited file is caught;
    the model's metadata, which holds the digest, is outside the graph."""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


def _check_graph(path: Path, expected: str) -> None:
    import onnx

    if graph_sha256(onnx.load(str(path)).graph) != expected:
        raise ZsqError(
            f"{path}: its graph and weights do not match the sha256 its metadata records "
            "(damaged or edited); export the run again"
        )


def _strip_debug_info(graph: Any) -> None:
    """Drop the exporter's per-node debug records (PyTorch stack traces, fx names: more than
    a third of a ResNet-20's file) and the intermediate shape annotations."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in (*graph.input, *graph.output, *graph.initializer):
        del value.metadata_props[:]
        value.doc_string = ""
    del graph.value_info[:]


def _input_name(module: nn.Module) -> str:
    """The name of the model's (single) input argument, which dynamic shapes are keyed by."""
    import inspect

    return next(iter(inspect.signature(module.forward).parameters))


def onnxruntime_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU onnxruntime session that runs the exported graph's own arithmetic.

    Graph optimisation stays at ``ORT_ENABLE_BASIC``: the default (``ORT_ENABLE_ALL``) fuses a
    weight-only-quantized Linear's ``DequantizeLinear -> MatMul`` into ``MatMulNBits``, whose
    arithmetic differs from the student's (max |diff| ~1e-2 on a ViT), so a check or an
    evaluation would measure onnxruntime's rewrite instead of the export."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads is not None:
        options.intra_op_num_threads = threads
    model = str(path) if is_utf8(str(path)) else Path(path).read_bytes()  # ORT: UTF-8 paths
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel(nn.Module):
    """An exported ONNX model run by onnxruntime on the CPU, callable like the student (for
    :func:`zsq.evaluate.evaluate`); ``info`` holds its ``zsq.*`` metadata."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        require_onnx()
        import json

        try:
            self.session = onnxruntime_session(path, threads)
        except Exception as err:  # onnxruntime's own error types
            raise ZsqError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = {k[4:]: json.loads(v) for k, v in meta.items() if k.startswith("zsq.")}
        digest = self.info.pop(DIGEST_KEY, None)  # older exports record none
        if digest is not None:
            _check_graph(Path(path), digest)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)
