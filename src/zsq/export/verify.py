"""Check an export against the student it came from, on a random batch (a smoke check: the
accuracy comparison on real data is in benchmarks/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECK_BATCH = 16


@torch.no_grad()
def verify_export(
    student: nn.Module, path: Path, fmt: str, image_shape: tuple[int, int, int], seed: int = 0
) -> dict[str, Any]:
    """int: the reloaded student's outputs equal the original's bit for bit. onnx: the
    onnxruntime outputs' max difference and argmax agreement with the student."""
    x = torch.randn(CHECK_BATCH, *image_shape, generator=torch.Generator().manual_seed(seed))
    expected = student.cpu()(x)
    if fmt == "int":
        from zsq.export.integer import load_int

        identical = torch.equal(load_int(path)(x), expected)
        summary = "reloaded student: " + (
            "bit-identical outputs" if identical else "OUTPUTS DIFFER"
        )
        return {"identical_outputs": identical, "summary": summary}
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    diff = float((got - expected).abs().max())
    agree = float((got.argmax(1) == expected.argmax(1)).float().mean())
    summary = (
        f"onnxruntime vs student on {CHECK_BATCH} random inputs: max |diff| {diff:.2e}, "
        f"argmax agreement {agree:.0%}"
    )
    return {"max_abs_diff": diff, "argmax_agreement": agree, "summary": summary}
