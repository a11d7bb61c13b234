"""Where each layer's input is quantized under the ``auto`` activation placement.

The reference code quantizes the output of every ReLU/ReLU6 module; on a network whose
activations are SiLU, GELU or hardswish (or functional ReLUs) that leaves most layer inputs in
full precision. ``auto`` keeps the reference wherever it covers a layer and quantizes the
layer's own input elsewhere: one forward pass at batch 1 follows every tensor from where it was
made to the Conv2d/Linear that reads it. A layer reading a quantized ReLU output (directly or
through ops that mix it with nothing else: pooling, flatten, padding, a scalar factor) is covered
by that ReLU's quantizer, as in the reference; a layer reading the image (the same way) keeps it
in full precision, as the reference does; every other layer gets its input quantized. On the
CIFAR ResNets every layer is of the first two kinds, so ``auto`` builds the reference student.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from zsq.quant.modules import QuantConv2d, QuantLinear
from zsq.quant.probe import inspect_forward
from zsq.quant.spec import QuantSpec

ACTIVATIONS = (nn.ReLU, nn.ReLU6)
IMAGE = "image"


class _Lineage(TorchFunctionMode):
    """Tags tensors by origin: the image, a set of quantized ReLU outputs, or nothing. An
    op's output keeps the tag its floating-point inputs share (a weight or any other tensor
    breaks it)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, tuple[Any, torch.Tensor]] = {}  # id -> (tag, the tensor, kept alive)

    def tag(self, tensor: torch.Tensor, tag: Any) -> None:
        self.tags[id(tensor)] = (tag, tensor)

    def tag_of(self, tensor: torch.Tensor) -> Any:
        entry = self.tags.get(id(tensor))
        return entry[0] if entry is not None and entry[1] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [
            t for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]  # fmt: skip
        tag = _shared_tag([self.tag_of(t) for t in inputs]) if inputs else None
        name = getattr(func, "__name__", "")
        if name == "__setitem__" and inputs:  # x[i] = v: x now holds v's kind too
            self.tag(args[0], tag)
            return out
        in_place = name.endswith("_") or "out" in kwargs
        for result in tree_flatten(out)[0]:
            if not isinstance(result, torch.Tensor) or not result.is_floating_point():
                continue
            if any(result is t for t in inputs) and not in_place:
                continue  # returned unchanged (x.to(x.dtype), x.contiguous()): keeps its tag
            self.tag(result, tag)
        return out


def _shared_tag(tags: list[Any]) -> Any:
    """The image if every input is the image, the union of ReLU names if every input comes
    from quantized ReLUs, else None."""
    if all(t == IMAGE for t in tags):
        return IMAGE
    if all(isinstance(t, frozenset) for t in tags):
        return frozenset().union(*tags)
    return None


def layer_inputs(model: nn.Module, spec: QuantSpec, image_shape: Sequence[int]) -> dict[str, str]:
    """For every Conv2d/Linear of the float ``model``: where its input is quantized under
    ``auto`` placement — ``"after NAME[, NAME...]"`` (the ReLU modules whose quantizers cover it),
    ``"image"`` (the model's input: full precision) or ``"input"`` (at the layer)."""
    lineage = _Lineage()
    seen: dict[str, Any] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, ACTIVATIONS) and spec.for_layer(name).abits is not None:
            hooks.append(module.register_forward_hook(_tag_output(lineage, name)))
        elif isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_pre_hook(_note_input(lineage, seen, name)))
    hooks.append(model.register_forward_pre_hook(_tag_image(lineage)))
    try:
        with lineage:
            inspect_forward(model, image_shape)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: _placement_word(seen.get(name)) for name in _layer_names(model)}


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _placement_word(tag: Any) -> str:
    if tag == IMAGE:
        return IMAGE
    if isinstance(tag, frozenset) and tag:
        return "after " + ", ".join(sorted(tag))
    return "input"  # also a layer the forward never reached: quantized where it is read


def _tag_output(lineage: _Lineage, name: str):  # noqa: ANN202
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        lineage.tag(output, frozenset({name}))

    return hook


def _note_input(lineage: _Lineage, seen: dict[str, Any], name: str):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple) -> None:
        tag = lineage.tag_of(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        if name in seen and seen[name] != tag:  # a layer called twice on inputs of two kinds
            tag = None
        seen[name] = tag

    return hook


def _tag_image(lineage: _Lineage):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple) -> None:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                lineage.tag(arg, IMAGE)

    return hook


def resolve_placement(model: nn.Module, spec: QuantSpec, image_shape: Sequence[int]) -> QuantSpec:
    """``spec`` with ``quantized_inputs`` found (``auto`` placement only; any other spec, or
    one already resolved, is returned as it is)."""
    if spec.act_placement != "auto" or spec.quantized_inputs is not None:
        return spec
    if not _layer_names(model):  # nothing to place (quantize_model says so)
        return replace(spec, quantized_inputs=())
    places = layer_inputs(model, spec, image_shape)
    return replace(spec, quantized_inputs=tuple(n for n, p in places.items() if p == "input"))


def input_placements(
    model: nn.Module, student: nn.Module, spec: QuantSpec, image_shape: Sequence[int]
) -> dict[str, str]:
    """Where each quantized layer of ``student`` (made from ``model`` by ``spec``) has its input
    quantized: ``"input"`` (a quantizer at the layer), ``"after NAME"`` (by those ReLU modules'
    quantizers), ``"image"`` (the model's input, kept in full precision) or ``"full
    precision"`` — what ``quant.json`` and the report record."""
    traced = layer_inputs(model, spec, image_shape) if spec.act_placement != "input" else {}
    places = {}
    for name, layer in student.named_modules():
        if not isinstance(layer, QuantConv2d | QuantLinear):
            continue
        quantizer = layer.act_quant
        if quantizer is not None and quantizer.bits is not None:
            places[name] = "input"
        elif traced.get(name, "").startswith("after "):
            places[name] = traced[name]
        else:
            places[name] = IMAGE if traced.get(name) == IMAGE else "full precision"
    return places


def placement_summary(places: dict[str, str]) -> str:
    """``"19 after a ReLU, 1 image (full precision)"``: the report's line."""
    words = {"input": "at the layer input", IMAGE: "image (full precision)"}
    counts: dict[str, int] = {}
    for place in places.values():
        word = "after a ReLU" if place.startswith("after ") else words.get(place, place)
        counts[word] = counts.get(word, 0) + 1
    return ", ".join(f"{count} {word}" for word, count in counts.items())
