"""The student of a ``zsq quantize`` output folder, rebuilt from its files, and its export
(what ``zsq export`` does): checked against the student before the files take their names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq.errors import ZsqError
from zsq.export._files import check_targets, staged
from zsq.export.integer import export_files, export_int
from zsq.export.sizes import size_report
from zsq.export.verify import verify_export
from zsq.io import MARKER_FILE, checkpoint_file, partial_dir, read_marker
from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model

STUDENT_FILE = "student.safetensors"
REPORT_FILE = "report.json"
RUN_FILES = (MARKER_FILE, REPORT_FILE, STUDENT_FILE)  # what the student is rebuilt from
DEFAULT_EXPORT = {"int": "student.int.safetensors", "onnx": "student.onnx"}


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Export the student of a finished quantize run as ``fmt`` (``int`` or ``onnx``) to ``out``
    (default: ``DEFAULT_EXPORT`` in the run folder), refusing existing files unless
    ``overwrite``. The files are written under temporary names and checked against the student
    (:func:`~zsq.export.verify.verify_export`) before they take theirs: a failed check is an
    error that leaves nothing behind. Returns ``format``, ``out``, ``bytes``, ``check`` and
    ``sizes`` (:func:`~zsq.export.sizes.size_report`)."""
    if fmt not in DEFAULT_EXPORT:
        raise ZsqError(f"unknown export format {fmt!r}; use one of {', '.join(DEFAULT_EXPORT)}")
    if fmt == "onnx":
        from zsq.export.onnx import require_onnx

        require_onnx()
    folder = Path(run_dir)
    check_run_folder(folder)
    path = Path(out) if out is not None else folder / DEFAULT_EXPORT[fmt]
    targets = _export_targets(path, fmt)
    check_targets(targets, overwrite=overwrite, keep=[folder / name for name in RUN_FILES])
    student, info = student_from_run(folder)
    with staged(targets, overwrite=overwrite) as temporary:
        check = _write_and_verify(student, temporary[0], fmt, info)
        if not check["passed"]:
            raise ZsqError(
                f"the export failed its check ({check['summary']}), so {path} was not written; "
                "this is a zsq bug: please report it"
            )
    return {
        "format": fmt,
        "out": str(path),
        "bytes": path.stat().st_size,
        "check": check,
        "sizes": size_report(student),
    }


def _export_targets(path: Path, fmt: str) -> list[Path]:
    """The files an export to ``path`` writes; ``path`` must have the format's suffix."""
    if fmt == "int":
        if path.suffix != ".safetensors":
            raise ZsqError(
                f"--out {path}: an integer export is a .safetensors file (its manifest goes "
                "beside it as .json)"
            )
        return export_files(path)
    if path.suffix != ".onnx":
        raise ZsqError(f"--out {path}: an ONNX export is a .onnx file")
    return [path]


def _write_and_verify(
    student: nn.Module, path: Path, fmt: str, info: dict[str, Any]
) -> dict[str, Any]:
    shape = tuple(info["image_shape"])
    if fmt == "int":
        export_int(student, path, info)
    else:
        from zsq.export.onnx import export_onnx

        export_onnx(student, path, shape, info)
    return verify_export(student, path, fmt, shape)


def student_from_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The fake-quant student of a finished quantize run and what describes its model
    (``name``, ``num_classes``, ``in_channels``, ``image_shape``, ``act_placement``, ...)."""
    from safetensors.torch import load_file

    from zsq.models import create_model

    folder = Path(run_dir)
    record = check_run_folder(folder)
    options, report = record.get("options", {}), json.loads((folder / REPORT_FILE).read_text())
    model = create_model(
        options["--model"],
        num_classes=options["--num-classes"],
        in_channels=options["--in-channels"],
        model_kwargs=options.get("--model-kwarg"),
    )
    spec = _student_spec(report, model)
    student = quantize_model(model, spec)
    state = load_file(str(folder / STUDENT_FILE))
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


def check_run_folder(folder: Path) -> dict[str, Any]:
    """The run record of ``folder`` if it is a finished quantize run, else an error that says
    what it is instead: missing, unfinished (only ``FOLDER.partial``), a file, or no run."""
    if not folder.exists():
        work = partial_dir(folder)
        if read_marker(work) is None:
            raise ZsqError(f"no zsq run at {folder}; give the output folder of `zsq quantize`")
        shown = work if folder.is_absolute() else os.path.relpath(work)
        if checkpoint_file(work).exists():
            raise ZsqError(
                f"{folder} is an unfinished run ({shown}); finish it with `zsq quantize ... "
                f"--resume {folder}` first"
            )
        raise ZsqError(
            f"{folder} is an unfinished run ({shown}) that stopped before its first checkpoint; "
            f"run `zsq quantize ... --out {folder} --overwrite` again first"
        )
    if not folder.is_dir():
        raise ZsqError(f"{folder} is a file; give the output folder of a `zsq quantize` run")
    record = read_marker(folder)
    if record is None or not all((folder / name).is_file() for name in RUN_FILES[1:]):
        raise ZsqError(
            f"{folder} is not the output folder of a finished `zsq quantize` run (it needs "
            f"{', '.join(RUN_FILES)}); give such a folder"
        )
    return record


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
