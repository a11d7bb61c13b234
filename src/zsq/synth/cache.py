"""Synthetic images kept on disk: a run directory keeps the images it calibrated on, and a
resumed or repeated run loads them instead of making them again.

A file records what made it (the source's options and the teacher's tensor digest); loading it
for other options or another teacher is an error, never a silent reuse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.io import read_safetensors, save_safetensors
from zsq.runtime import module_digest


def save_images(
    path: Path, images: Tensor, key: dict[str, Any], teacher: nn.Module, report: dict[str, Any]
) -> None:
    metadata = {
        "key": json.dumps(key, sort_keys=True),
        "teacher_sha256": module_digest(teacher),
        "report": json.dumps(report),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({"images": images}, path, metadata)


def load_images(
    path: Path, key: dict[str, Any], teacher: nn.Module
) -> tuple[Tensor, dict[str, Any]] | None:
    """The images saved at ``path`` and their report, None when there is no file there."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = read_safetensors(path)
        images = tensors["images"]
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ZsqError(
            f"cannot read synthetic images {path}: {err}; delete it to make new ones"
        ) from None
    if metadata.get("key") != json.dumps(key, sort_keys=True):
        raise ZsqError(
            f"{path} holds images made with other options ({metadata.get('key')}); delete it "
            "or give the options it was made with"
        )
    if metadata.get("teacher_sha256") != module_digest(teacher):
        raise ZsqError(f"{path} holds images made for another teacher; delete it to make new ones")
    return images, json.loads(metadata.get("report", "{}"))
