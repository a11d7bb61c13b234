"""Output directories and files that are either complete or absent (never half-written)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from zsq.errors import ZsqError

PARTIAL_SUFFIX = ".partial"
CHECKPOINT_DIRNAME = "checkpoint"


def partial_dir(out: Path) -> Path:
    """Where a run writes until it completes; renamed to ``out`` at the end."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def check_output_dir(out: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Fail early, before any work, if ``out`` cannot be created as a fresh result folder."""
    if resume and out.exists() and not partial_dir(out).exists():
        raise ZsqError(f"the run in {out} already finished; there is nothing to resume")
    if out.exists() and not overwrite:
        raise ZsqError(f"output directory {out} already exists; pass --overwrite or choose another")
    if partial_dir(out).exists() and not (resume or overwrite):
        raise ZsqError(
            f"{partial_dir(out)} holds an unfinished run; continue it with --resume {out} or "
            "pass --overwrite to start again"
        )
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: permission bits say nothing for root or for special filesystems
        Path(tempfile.mkdtemp(dir=parent, prefix=".zsq-probe-")).rmdir()
    except OSError:
        raise ZsqError(
            f"cannot write to {parent}; choose an output directory you can write to"
        ) from None


@contextmanager
def atomic_output_dir(
    out: Path, *, overwrite: bool = False, resume: bool = False
) -> Iterator[Path]:
    """Yield a working folder that becomes ``out`` only if the block succeeds.

    On failure the working folder is removed, unless it holds a checkpoint a run can resume.
    """
    check_output_dir(out, overwrite=overwrite, resume=resume)
    work = partial_dir(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        if not (work / CHECKPOINT_DIRNAME).exists():
            shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    checkpoints = work / CHECKPOINT_DIRNAME
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    work.rename(out)


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")

    _atomic_replace(path, write)


def write_text(path: Path, text: str) -> None:
    _atomic_replace(path, lambda tmp: Path(tmp).write_text(text))


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file then rename: a crash never leaves a torn checkpoint."""
    _atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(
    state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None
) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    _atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
