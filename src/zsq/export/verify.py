"""Check an export against the student it came from, on a random batch (a smoke check: the
accuracy comparison on real data is in benchmarks/), and the student before it is exported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.quant import act_quantizers, quant_layers

CHECK_BATCH = 16


def check_finite(student: nn.Module) -> None:
    """Refuse a student with NaN or inf in a tensor or a scale (a diverged run): its codes would
    be garbage, and the ONNX exporter fails deep inside on them."""
    for name, tensor in _exported_tensors(student):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ZsqError(
                f"the student's {name} holds NaN or inf values (the run diverged); quantize "
                "again (e.g. a lower learning rate or a different seed), then export"
            )


@torch.no_grad()
def _exported_tensors(student: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The student's tensors in module order, then the scales the export derives from them."""
    yield from student.state_dict().items()
    for name, layer in quant_layers(student):
        if layer.wbits is not None:
            yield f"{name} weight scale", layer.weight_qparams()[0]
    for name, aq in act_quantizers(student):
        if aq.bits is not None:
            yield f"{name} activation scale", aq.qparams()[0]


@torch.no_grad()
def verify_export(
    student: nn.Module, path: Path, fmt: str, image_shape: tuple[int, int, int], seed: int = 0
) -> dict[str, Any]:
    """Whether the export at ``path`` may be kept (``passed``) and a one-line ``summary``.

    int: the reloaded student's outputs equal the original's bit for bit. onnx: onnxruntime's
    outputs and the student's are finite and of one shape; their max difference and argmax
    agreement are reported, not judged (onnxruntime rounds ties its own way, which moves
    logits, and on random inputs even argmaxes: no tolerance holds for every model). The
    session is :func:`zsq.export.onnx.onnxruntime_session`'s: the graph's own arithmetic, not
    onnxruntime's extended fusions."""
    x = torch.randn(CHECK_BATCH, *image_shape, generator=torch.Generator().manual_seed(seed))
    expected = student.cpu()(x)
    if fmt == "int":
        from zsq.export.integer import load_int

        identical = torch.equal(load_int(path)(x), expected)
        summary = "reloaded student: " + (
            "bit-identical outputs" if identical else "OUTPUTS DIFFER"
        )
        return {"passed": identical, "identical_outputs": identical, "summary": summary}
    from zsq.export.onnx import OnnxRuntimeModel  # here: onnx imports this module

    got = OnnxRuntimeModel(path)(x)
    finite = bool(torch.isfinite(got).all()) and bool(torch.isfinite(expected).all())
    if got.shape != expected.shape or not finite:
        summary = (
            f"onnxruntime vs student: OUTPUTS DIFFER (shapes {tuple(got.shape)} and "
            f"{tuple(expected.shape)}{'' if finite else ', NaN or inf'})"
        )
        return {"passed": False, "summary": summary}
    diff = float((got - expected).abs().max())
    agree = float((got.argmax(1) == expected.argmax(1)).float().mean())
    summary = (
        f"onnxruntime vs student on {CHECK_BATCH} random inputs: max |diff| {diff:.2e}, "
        f"argmax agreement {agree:.0%}"
    )
    return {"passed": True, "max_abs_diff": diff, "argmax_agreement": agree, "summary": summary}
