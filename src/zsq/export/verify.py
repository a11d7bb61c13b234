"""Check an export against the student it came from, on a random batch (a smoke check: the
accuracy comparison on real data is in benchmarks/), and the student before it is exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq.export.integer import load_int
from zsq.export.onnx import OnnxRuntimeModel

CHECK_BATCH = 16


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
        identical = torch.equal(load_int(path)(x), expected)
        summary = "reloaded student: " + (
            "bit-identical outputs" if identical else "OUTPUTS DIFFER"
        )
        return {"passed": identical, "identical_outputs": identical, "summary": summary}
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
