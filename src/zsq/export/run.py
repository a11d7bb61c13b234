"""The student of a ``zsq quantize`` output folder, rebuilt from its files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq.errors import ZsqError
from zsq.io import read_marker
from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model

STUDENT_FILE = "student.safetensors"


def student_from_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The fake-quant student of a finished quantize run and what describes its model
    (``name``, ``num_classes``, ``in_channels``, ``image_shape``, ``act_placement``, ...)."""
    from safetensors.torch import load_file

    from zsq.models import create_model

    folder = Path(run_dir)
    record = read_marker(folder) if folder.is_dir() else None
    report_file, student_file = folder / "report.json", folder / STUDENT_FILE
    if record is None or not report_file.is_file() or not student_file.is_file():
        raise ZsqError(
            f"{folder} is not the output folder of a finished `zsq quantize` run (it needs "
            f".zsq-run, report.json and {STUDENT_FILE}); give such a folder"
        )
    options, report = record.get("options", {}), json.loads(report_file.read_text())
    model = create_model(
        options["--model"],
        num_classes=options["--num-classes"],
        in_channels=options["--in-channels"],
        model_kwargs=options.get("--model-kwarg"),
    )
    spec = _student_spec(report, model)
    student = quantize_model(model, spec)
    state = load_file(str(student_file))
    _prepare_optional_buffers(student, state)
    student.load_state_dict(state)
    for _, aq in act_quantizers(student):
        aq.observing = False
    info = {
        "name": options["--model"],
        "num_classes": options["--num-classes"],
        "in_channels": options["--in-channels"],
        "model_kwargs": options.get("--model-kwarg"),
        "image_shape": options["--image-size (input shape)"],
        "normalize_mean": options.get("--normalize-mean"),
        "normalize_std": options.get("--normalize-std"),
        "act_placement": spec.act_placement,
        "method": report.get("method"),
    }
    return student.eval(), info


def _student_spec(report: dict[str, Any], model: nn.Module) -> QuantSpec:
    """The spec the student was built with: the run's, with LAPQ's weight scheme for LAPQ."""
    spec = QuantSpec(**report["quant_spec"])
    if report.get("method") == "lapq":
        from zsq.ptq.lapq import lapq_spec

        spec = lapq_spec(spec, model, report["lapq"]["config"]["layers"])
    return spec


def _prepare_optional_buffers(student: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Register the post-training buffers (fixed range, offset) the saved student has."""
    for name, layer in quant_layers(student):
        if f"{name}.w_range_min" in state:
            layer.set_weight_range(state[f"{name}.w_range_min"], state[f"{name}.w_range_max"])
        if f"{name}.w_offset" in state:
            layer.set_weight_offset(state[f"{name}.w_offset"])
