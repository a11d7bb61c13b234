"""The export of a finished run's student (what ``zsq export`` does): written under temporary
names and checked against the student before the files take their names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from zsq.errors import ConfigError, ZsqError
from zsq.export._files import check_targets, staged
from zsq.export.integer import export_files, export_int
from zsq.export.sizes import size_report
from zsq.export.verify import verify_export
from zsq.layout import EXPORT_FILES, RunLayout
from zsq.run.finished import open_run, student_from_run


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Export the student of a finished quantize run as ``fmt`` (``int`` or ``onnx``) to ``out``
    (default: :meth:`RunLayout.export` in the run folder), refusing existing files unless
    ``overwrite``. The files are written under temporary names and checked against the student
    (:func:`~zsq.export.verify.verify_export`) before they take theirs: a failed check is an
    error that leaves nothing behind. Returns ``format``, ``out``, ``bytes``, ``check`` and
    ``sizes`` (:func:`~zsq.export.sizes.size_report`)."""
    if fmt not in EXPORT_FILES:
        raise ZsqError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FILES)}")
    if fmt == "onnx":
        from zsq.export.onnx import require_onnx

        require_onnx()
    folder = open_run(run_dir).folder
    path = Path(out) if out is not None else RunLayout(folder).export(fmt)
    targets = _export_targets(path, fmt)
    check_targets(
        targets, overwrite=overwrite, keep=[folder / name for name in RunLayout.STUDENT_FILES]
    )
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
            raise ConfigError(
                f"«out» {path}: an integer export is a .safetensors file (its manifest goes "
                "beside it as .json)",
            )
        return export_files(path)
    if path.suffix != ".onnx":
        raise ConfigError(f"«out» {path}: an ONNX export is a .onnx file")
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
