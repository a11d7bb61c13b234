"""Synthetic images kept on disk: a run directory keeps the images it calibrated on, and a
resumed or repeated run loads them instead of making them again. A pool made batch by batch
(Genie-D: an hour a batch on a CPU with the reference's settings) also keeps the batches made so
far, so an interrupted run loses at most the batch in progress.

A file records what made it (the source's options and the teacher's tensor digest); loading it
for other options or another teacher is an error, never a silent reuse.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.io import read_safetensors, read_verified, save_safetensors, write_verified
from zsq.layout import digest_file
from zsq.runtime import module_digest, rng_state, set_rng_state


def save_images(
    path: Path,
    images: Tensor,
    key: dict[str, Any],
    teacher: nn.Module,
    report: dict[str, Any],
    with_rng: bool = False,
) -> None:
    """``with_rng``: also the random state now (a run's own images: a resumed run that loads
    them goes on as the run that made them did)."""
    metadata = {
        "key": json.dumps(key, sort_keys=True),
        "teacher_sha256": module_digest(teacher),
        "report": json.dumps(report),
    }
    if with_rng:
        metadata["rng"] = _rng_as_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({"images": images}, path, metadata)


def load_images(
    path: Path, key: dict[str, Any], teacher: nn.Module, restore_rng: bool = False
) -> tuple[Tensor, dict[str, Any]] | None:
    """The images saved at ``path`` and their report, None when there is no file there;
    ``restore_rng``: the random state set to the one saved with them (when it was)."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = read_safetensors(path)
        images = tensors["images"]
        rng = _rng_from_text(metadata["rng"]) if restore_rng and "rng" in metadata else None
    except Exception as err:  # safetensors and torch raise their own error types for damage
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
    _check_images(path, images, key)
    if rng is not None:
        set_rng_state(rng)
    return images, json.loads(metadata.get("report", "{}"))


def _check_images(path: Path, images: Tensor, key: dict[str, Any]) -> None:
    """The images are what the file's own record says (count and shape): a file written over
    by other code is refused here, not met later as a shape error deep in a forward."""
    count = key.get("size", key.get("num_images", len(images)))
    shape = [count, *key.get("image_shape", images.shape[1:])]
    if not images.is_floating_point() or list(images.shape) != shape:
        raise ZsqError(
            f"{path} holds {images.dtype} images of shape {list(images.shape)}, not the {shape} "
            "its record names (damaged or written by other code); delete it to make new ones"
        )


def _rng_as_text() -> str:
    """The random state now, as text for a safetensors header."""
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _rng_from_text(text: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def save_batches(
    path: Path,
    tensors: dict[str, Tensor],
    key: dict[str, Any],
    teacher: nn.Module,
    report: dict[str, Any],
) -> None:
    """The batches of a pool made so far (``tensors``: the images, and what else the source
    needs to go on), what made them, their report and the random state after them, written
    atomically with a digest: a resumed run continues with the next batch exactly as the
    interrupted one would have."""
    state = {
        "key": json.dumps(key, sort_keys=True),
        "teacher_sha256": module_digest(teacher),
        "tensors": {name: t.detach().cpu() for name, t in tensors.items()},
        "report": json.dumps(report),
        "rng": rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_verified(path, buffer.getvalue())


def load_batches(
    path: Path, key: dict[str, Any], teacher: nn.Module
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The tensors of the batches saved at ``path`` and their report, with the random state
    restored to what it was after them; None when there is no file there."""
    if not path.is_file():
        return None
    fix = f"delete {path} to make the images again"
    try:
        state = torch.load(io.BytesIO(read_verified(path, fix)), weights_only=True)
        tensors, recorded, report = state["tensors"], state["key"], json.loads(state["report"])
    except ZsqError:
        raise
    except Exception as err:  # torch's unpickler raises many types for a damaged payload
        raise ZsqError(f"cannot read the images made so far, {path} ({err}); {fix}") from None
    if recorded != json.dumps(key, sort_keys=True):
        raise ZsqError(f"{path} holds images made with other options ({recorded}); {fix}")
    if state["teacher_sha256"] != module_digest(teacher):
        raise ZsqError(f"{path} holds images made for another teacher; {fix}")
    set_rng_state(state["rng"])
    return tensors, report


def remove_batches(path: Path) -> None:
    """Drop the batches file once the whole pool is kept."""
    path.unlink(missing_ok=True)
    digest_file(path).unlink(missing_ok=True)
