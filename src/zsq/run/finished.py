"""A finished run folder as export and analysis read it: its record, its report, its student.

A run's record names the model and the quantization it was made with, so its student can be
rebuilt from the folder alone (with the method's hook where its student keeps extra state).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from zsq.errors import ZsqError
from zsq.io import partial_dir, read_marker
from zsq.layout import RunLayout
from zsq.methods.base import Method, get_method
from zsq.quant import QuantSpec, act_quantizers, prepare_buffers, quantize_model
from zsq.run.record import check_file_digests, read_options


@dataclass(frozen=True)
class FinishedRun:
    """A finished quantize run folder: its record's options (as field paths) and its report."""

    folder: Path
    options: dict[str, Any]
    report: dict[str, Any]

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.folder)

    @property
    def method(self) -> str:
        """As the report names it: gdfq, gdfq+ait, minmax, ..."""
        return str(self.report.get("method", "?"))

    @property
    def base_method(self) -> str:
        """The registered method (no "+ait")."""
        return str(self.options.get("method") or self.method.removesuffix("+ait"))

    @property
    def registered(self) -> Method | None:
        """The run's method in the registry (None for one zsq no longer knows)."""
        try:
            return get_method(self.base_method)
        except ZsqError:
            return None


def open_run(folder: str | Path, *, marker: bool = True) -> FinishedRun:
    """The finished run in ``folder``, else an error that says what it is instead: missing,
    unfinished (only ``FOLDER.partial``), a file, or no run. ``marker=False`` also accepts
    folders written before runs carried a ``.zsq-run`` marker (by their report and student)."""
    folder = Path(folder)
    if not folder.exists():
        _refuse_missing(folder)
    if not folder.is_dir():
        raise ZsqError(f"{folder} is a file; give the output folder of a `zsq quantize` run")
    layout = RunLayout(folder)
    record = read_marker(folder)
    needed = RunLayout.STUDENT_FILES if marker else (RunLayout.REPORT, RunLayout.STUDENT)
    if (marker and record is None) or not all((folder / name).is_file() for name in needed[-2:]):
        raise ZsqError(
            f"{folder} is not a zsq run folder (a finished `zsq quantize` run holds "
            f"{', '.join(needed)}); give such a folder"
        )
    check_file_digests(folder, record or {})
    try:
        report = json.loads(layout.report.read_text())
    except (OSError, ValueError) as err:
        raise ZsqError(f"{layout.report} is unreadable ({err}); rerun the quantize") from None
    if not isinstance(report, dict) or "method" not in report:
        raise ZsqError(f"{layout.report} is not a zsq quantize report (no method)")
    return FinishedRun(folder, read_options(record or {}), report)


def _refuse_missing(folder: Path) -> None:
    work = partial_dir(folder)
    if read_marker(work) is None:
        raise ZsqError(f"no zsq run at {folder}; give the output folder of `zsq quantize`")
    shown = work if folder.is_absolute() else os.path.relpath(work)
    if RunLayout(work).checkpoint.exists():
        raise ZsqError(
            f"{folder} is an unfinished run ({shown}); finish it with `zsq quantize ... "
            f"--resume {folder}` first (in Python: zsq.quantize(..., resume=True))"
        )
    raise ZsqError(
        f"{folder} is an unfinished run ({shown}) that stopped before its first checkpoint; "
        f"run `zsq quantize ... --out {folder} --overwrite` again first (in Python: "
        "zsq.quantize(..., overwrite=True))"
    )


def model_info(run: FinishedRun) -> dict[str, Any]:
    """What describes the run's model (``name``, ``num_classes``, ``in_channels``,
    ``image_shape``, normalisation, ``act_placement`` and ``quantized_inputs``, ``method``), as
    exports record it."""
    options = run.options
    return {
        "name": options.get("teacher.model"),
        "num_classes": options.get("teacher.num_classes"),
        "in_channels": options.get("teacher.in_channels"),
        "model_kwargs": options.get("teacher.model_kwargs"),
        "image_shape": options.get("image_shape"),
        "normalize_mean": options.get("teacher.normalize_mean"),
        "normalize_std": options.get("teacher.normalize_std"),
        "act_placement": run.report.get("quant_spec", {}).get("act_placement"),
        "quantized_inputs": run.report.get("quant_spec", {}).get("quantized_inputs"),
        "method": run.report.get("method"),
    }


def student_from_run(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The fake-quant student of a finished quantize run and what describes its model
    (:func:`model_info`)."""
    from zsq.io import read_safetensors
    from zsq.models import create_model

    run = open_run(folder)
    info = model_info(run)
    if info["name"] is None:
        raise ZsqError(
            f"{run.folder}: the run's teacher was a Python module, not a model zsq can build by "
            "name; rebuild its student in Python (zsq.quant.quantize_model and "
            f"{RunLayout.STUDENT})"
        )
    model = create_model(
        info["name"],
        num_classes=info["num_classes"],
        in_channels=info["in_channels"],
        model_kwargs=info["model_kwargs"],
    )
    spec = QuantSpec(**run.report["quant_spec"])
    if run.registered is not None:
        spec = run.registered.handler.student_spec(run.report, spec, model)
    student = quantize_model(model, spec)
    try:
        state, _ = read_safetensors(run.layout.student)
    except Exception as err:  # safetensors' own error type: truncated or not safetensors
        raise ZsqError(
            f"{run.layout.student} is unreadable ({str(err).splitlines()[0][:100]}); run the "
            "quantize again"
        ) from None
    prepare_buffers(student, state)
    student.load_state_dict(state)
    for _, aq in act_quantizers(student):
        aq.observing = False
    info["act_placement"] = spec.act_placement
    info["quantized_inputs"] = spec.quantized_inputs
    return student.eval(), info
