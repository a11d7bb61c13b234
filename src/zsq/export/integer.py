"""Integer export: codes, scales and zero points a deployment stack can read, and back.

``export_int(student, path, model)`` writes ``path`` (safetensors) and ``path`` with the suffix
``.json`` (the manifest), neither of which may exist unless ``overwrite=True``. For every
quantized Conv2d/Linear: the integer codes ``q`` (int8, or two per byte for 4 bits and below,
see :mod:`zsq.export.packing`), the per-channel scale ``S`` and zero point ``z`` of paper
Eq. 2-4 (the weight is ``(q + z) / S``), the range they were made from (so a rebuilt student
reproduces ``S`` and ``z`` bit for bit) and, after LAPQ's bias correction, the per-channel offset
added to the dequantized weight. For every activation quantizer: bits, range, scale, zero point.
Everything else (BatchNorm, biases, layers left in full precision) is stored as float. The
manifest records the model to rebuild and the sha256 of the tensors, and its own sha256 is kept
in the tensor file, so an edited manifest and a damaged tensor file are both refused.

``load_int(path)`` rebuilds the fake-quant student from those two files alone (and zsq's model
zoo): its outputs equal the exported student's bit for bit. ``integer_linear``/``integer_conv2d``
compute a layer the way an integer engine would: integer levels, int64 accumulation, one float
rescale per output channel.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq._version import __version__
from zsq.errors import ZsqError
from zsq.export._files import check_targets, staged
from zsq.export.finite import check_finite
from zsq.export.packing import is_packed, pack_codes, unpack_codes
from zsq.io import read_safetensors, save_safetensors, sha256_tensors, write_text
from zsq.layout import manifest_file
from zsq.quant import (
    ActQuantizer,
    QuantSpec,
    act_quantizers,
    code_range,
    dequantize,
    qparams_from_range,
    quant_layers,
    quantize_model,
    tensor_minmax,
)
from zsq.quant.modules import QuantConv2d, QuantLinear

FORMAT = "zsq-int"
FORMAT_VERSION = 1


def export_files(path: Path) -> list[Path]:
    """What an integer export to ``path`` writes: the tensors, then the manifest."""
    return [path, manifest_file(path)]


# --- export ----------------------------------------------------------------------------------
@torch.no_grad()
def export_int(
    student: nn.Module, path: str | Path, model: dict[str, Any], *, overwrite: bool = False
) -> dict[str, Any]:
    """Write the integer export of ``student`` and return its manifest. ``model``: what
    rebuilds the architecture (``name``, ``num_classes``, ``in_channels``, ``act_placement``,
    ``quantized_inputs``;
    ``image_shape`` and normalisation are recorded for the user). An existing ``path`` or
    manifest is an error unless ``overwrite``."""
    path = Path(path)
    check_targets(export_files(path), overwrite=overwrite)
    check_finite(student)
    if model.get("act_placement") == "auto":  # what the student has, not what a trace may find
        inputs = [n for n, layer in quant_layers(student) if layer.act_quant is not None]
        model = {**model, "quantized_inputs": inputs}
    tensors: dict[str, Tensor] = {}
    layers = {name: _export_layer(name, layer, tensors) for name, layer in quant_layers(student)}
    acts = {name: _export_act(aq) for name, aq in act_quantizers(student)}
    handled = _handled_keys(student)
    floats = {k: v for k, v in student.state_dict().items() if k not in handled}
    for key, value in floats.items():
        tensors[f"float.{key}"] = value
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zsq_version": __version__,
        "model": model,
        "layers": layers,
        "activations": acts,
        "float_tensors": sorted(floats),
        "tensors_sha256": sha256_tensors(tensors),
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    with staged(export_files(path), overwrite=overwrite) as (tensor_file, manifest_file):
        save_safetensors(tensors, tensor_file, {"format": FORMAT, "manifest_sha256": digest})
        write_text(manifest_file, text)
    return manifest


def _export_layer(name: str, layer: QuantConv2d | QuantLinear, tensors: dict) -> dict[str, Any]:
    kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
    entry: dict[str, Any] = {"kind": kind, "wbits": layer.wbits, "shape": list(layer.weight.shape)}
    if layer.wbits is None:
        return entry  # its weight goes with the float tensors
    scale, zero_point = layer.weight_qparams()
    codes = layer.quantized_weight().codes
    prefix = f"layers.{name}"
    if is_packed(layer.wbits):
        tensors[f"{prefix}.codes"] = pack_codes(codes, layer.wbits)
    else:
        tensors[f"{prefix}.codes"] = codes.to(torch.int8)
    tensors[f"{prefix}.scale"] = scale.reshape(-1).float()
    tensors[f"{prefix}.zero_point"] = zero_point.reshape(-1).to(torch.int16)
    grid = layer.w_scale is not None  # a learned grid: no range it came from
    if not grid:
        wmin, wmax = _weight_range(layer)
        tensors[f"{prefix}.range_min"] = wmin.reshape(-1)
        tensors[f"{prefix}.range_max"] = wmax.reshape(-1)
    entry.update(
        per_channel=layer.w_channel_axis == 0,
        symmetric=layer.w_symmetric,
        packed=is_packed(layer.wbits),
        has_offset=layer.w_offset is not None,
        fixed_range=layer.w_range_min is not None,
        grid=grid,
    )
    if layer.w_offset is not None:
        tensors[f"{prefix}.offset"] = layer.w_offset.reshape(-1)
    return entry


def _weight_range(layer: QuantConv2d | QuantLinear) -> tuple[Tensor, Tensor]:
    """The range the layer's scale and zero point come from (fixed, or the weights' own)."""
    if layer.w_range_min is not None:
        return layer.w_range_min, layer.w_range_max
    return tensor_minmax(layer.weight.detach(), layer.w_channel_axis)


def _export_act(aq: ActQuantizer) -> dict[str, Any]:
    entry: dict[str, Any] = {"bits": aq.bits, "symmetric": aq.symmetric}
    if aq.bits is None:
        return entry
    scale, zero_point = aq.qparams()
    entry.update(
        x_min=float(aq.x_min),
        x_max=float(aq.x_max),
        scale=float(scale),
        zero_point=int(zero_point),
        observed=int(aq.num_observed),
        grid=aq.has_grid,
    )
    return entry


def _handled_keys(student: nn.Module) -> set[str]:
    """State keys the export stores in integer form (the rest are float tensors)."""
    keys = set()
    for name, layer in quant_layers(student):
        if layer.wbits is not None:
            kept = ("weight", "w_range_min", "w_range_max", "w_offset", "w_scale", "w_zero_point")
            keys.update(f"{name}.{k}" for k in kept)
    for name, _ in act_quantizers(student):
        kept = ("x_min", "x_max", "num_observed", "grid_scale", "grid_zero_point")
        keys.update(f"{name}.{k}" for k in kept)
    return keys


# --- load ------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The manifest and tensors of an integer export, checked against each other."""
    path = Path(path)
    mpath = manifest_file(path)
    for p in (path, mpath):
        if not p.is_file():
            raise ZsqError(
                f"{p} not found; give the .safetensors file of an integer export (with its .json)"
            )
    text = mpath.read_text()
    try:
        tensors, metadata = read_safetensors(path)
    except Exception as err:  # safetensors raises its own types for a damaged file
        raise ZsqError(f"cannot read {path}: {err}; export it again") from None
    if metadata.get("format") != FORMAT:
        raise ZsqError(f"{path} is not a zsq integer export; export the run as integer tensors")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("manifest_sha256"):
        raise ZsqError(
            f"{mpath} does not match {path.name} (edited or truncated); export the run again"
        )
    manifest = json.loads(text)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ZsqError(
            f"{mpath} has format version {manifest.get('format_version')}; this zsq reads "
            f"{FORMAT_VERSION}"
        )
    expected = manifest.get("tensors_sha256")  # older exports record none
    if expected is not None and sha256_tensors(tensors) != expected:
        raise ZsqError(
            f"{path}: its tensors do not match the sha256 its manifest records (damaged or "
            "edited); export the run again"
        )
    return manifest, tensors


def load_int(path: str | Path) -> nn.Module:
    """The fake-quant student rebuilt from an integer export (weight ranges fixed to the
    exported ones, activation ranges frozen), in eval mode."""
    return int_student(*read_manifest(path), where=path)


@torch.no_grad()
def int_student(
    manifest: dict[str, Any], tensors: dict[str, Tensor], where: str | Path = "the export"
) -> nn.Module:
    """:func:`load_int` from what :func:`read_manifest` read (``where``: its file, for errors)."""
    from zsq.models import create_model

    path = where
    info = manifest["model"]
    model = create_model(
        info["name"],
        num_classes=info["num_classes"],
        in_channels=info["in_channels"],
        model_kwargs=info.get("model_kwargs"),
    )
    has_acts = any(a["bits"] is not None for a in manifest["activations"].values())
    spec = QuantSpec(
        wbits=8,
        abits=8 if has_acts else None,
        act_placement=info["act_placement"],
        quantized_inputs=info.get("quantized_inputs"),
    )
    student = quantize_model(model, spec, image_shape=info.get("image_shape"))
    layers = dict(quant_layers(student))
    if set(layers) != set(manifest["layers"]):
        raise ZsqError(f"{path}: its layers do not match model {info['name']}; export it again")
    for name, entry in manifest["layers"].items():
        _load_layer(layers[name], entry, tensors, f"layers.{name}")
    acts = dict(act_quantizers(student))
    for name, aq in acts.items():
        _load_act(aq, manifest["activations"].get(name, {"bits": None}))
    floats = {k: tensors[f"float.{k}"] for k in manifest["float_tensors"]}
    missing, unexpected = student.load_state_dict(floats, strict=False)
    if unexpected:
        raise ZsqError(f"{path}: tensors {unexpected[:3]} do not fit model {info['name']}")
    return student.eval()


def _load_layer(layer: QuantConv2d | QuantLinear, entry: dict, tensors: dict, prefix: str) -> None:
    layer.wbits = entry["wbits"]
    if layer.wbits is None:
        return
    layer.w_channel_axis = 0 if entry["per_channel"] else None
    layer.w_symmetric = entry["symmetric"]
    shape = entry["shape"]
    stored = tensors[f"{prefix}.codes"]
    numel = int(torch.tensor(shape).prod())
    codes = unpack_codes(stored, numel) if entry["packed"] else stored
    codes = codes.reshape(shape).float()
    if entry.get("grid"):  # a learned grid: its scale and zero point as they are
        scale = tensors[f"{prefix}.scale"]
        view = (-1,) + (1,) * (len(shape) - 1) if scale.numel() > 1 else ()
        scale = scale.reshape(view).to(layer.weight.dtype)
        zero_point = tensors[f"{prefix}.zero_point"].reshape(view).to(layer.weight.dtype)
        layer.set_weight_grid(scale, zero_point)
        layer.weight.copy_(dequantize(codes, scale, zero_point))
    else:
        wmin, wmax = tensors[f"{prefix}.range_min"], tensors[f"{prefix}.range_max"]
        view = (-1,) + (1,) * (len(shape) - 1) if wmin.numel() > 1 else ()
        wmin, wmax = wmin.reshape(view), wmax.reshape(view)
        scale, zero_point = qparams_from_range(wmin, wmax, layer.wbits, layer.w_symmetric)
        layer.weight.copy_(dequantize(codes, scale, zero_point))
        layer.set_weight_range(wmin, wmax)
    if entry["has_offset"]:
        layer.set_weight_offset(tensors[f"{prefix}.offset"])


def _load_act(aq: ActQuantizer, entry: dict) -> None:
    aq.bits = entry["bits"]
    aq.observing = False
    if aq.bits is None:
        return
    aq.symmetric = entry["symmetric"]
    aq.num_observed.fill_(entry.get("observed", 1))
    aq.set_range(entry["x_min"], entry["x_max"])
    if entry.get("grid"):
        aq.set_grid(entry["scale"], entry["zero_point"])


# --- what an integer engine computes ---------------------------------------------------------
def _levels(x: Tensor, aq: ActQuantizer) -> tuple[Tensor, Tensor]:
    """Integer levels ``q + z`` of an input on ``aq``'s grid, and ``1 / S`` as float64."""
    scale, zero_point = aq.qparams()
    codes = torch.clamp(torch.round(scale * x - zero_point), *code_range(aq.bits))
    return (codes + zero_point).to(torch.int64), 1.0 / scale.double()


def _weight_levels(layer: QuantConv2d | QuantLinear) -> tuple[Tensor, Tensor]:
    scale, zero_point = layer.weight_qparams()
    codes = layer.quantized_weight().codes
    return (codes + zero_point).to(torch.int64), (1.0 / scale.double()).reshape(-1)


@torch.no_grad()
def integer_linear(layer: QuantLinear, x: Tensor, aq: ActQuantizer) -> Tensor:
    """``layer`` on ``x`` quantized by ``aq``: int64 dot products of levels, one rescale."""
    xl, x_step = _levels(x, aq)
    wl, w_step = _weight_levels(layer)
    acc = xl @ wl.t()  # int64 accumulation
    out = acc.double() * (x_step * w_step)
    if layer.w_offset is not None:
        out += xl.sum(1, keepdim=True).double() * x_step * layer.w_offset.reshape(-1).double()
    if layer.bias is not None:
        out += layer.bias.double()
    return out.float()


@torch.no_grad()
def integer_conv2d(layer: QuantConv2d, x: Tensor, aq: ActQuantizer) -> Tensor:
    """``layer`` on ``x`` quantized by ``aq`` as an integer engine computes it: im2col of the
    integer levels (zero padding is level 0 = value 0), int64 matrix products per group, one
    float rescale per output channel."""
    if layer.padding_mode != "zeros":
        raise ZsqError("the integer reference handles zero padding only")
    xl, x_step = _levels(x, aq)
    wl, w_step = _weight_levels(layer)
    n, _, h, w = x.shape
    cols = F.unfold(xl.double(), layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    cols = cols.round().to(torch.int64)  # im2col only moves integers: exact
    g = layer.groups
    cols = cols.reshape(n, g, -1, cols.shape[-1])
    wl = wl.reshape(g, layer.out_channels // g, -1)
    acc = torch.einsum("gok,ngkl->ngol", wl, cols).reshape(n, layer.out_channels, -1)
    out = acc.double() * (x_step * w_step.reshape(1, -1, 1))
    if layer.w_offset is not None:
        window = cols.sum(2).repeat_interleave(layer.out_channels // g, dim=1)
        out += window.double() * x_step * layer.w_offset.reshape(1, -1, 1).double()
    if layer.bias is not None:
        out += layer.bias.double().reshape(1, -1, 1)
    oh = (
        h + 2 * layer.padding[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1
    ) // layer.stride[0] + 1
    return out.reshape(n, layer.out_channels, oh, -1).float()
