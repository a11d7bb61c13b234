"""The teacher's accuracy on a data set, measured once and reused by every run that asks again.

A report scores the teacher beside the student; measuring the same teacher on the same 10,000
images for every bit width and method doubles each report's evaluation time. The score is kept
in a small JSON file (``$ZSQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/zsq``, else ``~/.cache/zsq``)
under a key made of everything that decides it: the sha256 of the teacher's tensors, the data
spec with its path resolved and the path's size and modification time, the image count and
evaluation transform, the device type, and the zsq and torch versions. Anything else changes the
key and the teacher is measured again. Runs under torchrun do not use it (each rank would read
the file at a different moment), nor do data sets given as Python objects (nothing names them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq._version import __version__
from zsq.evaluate import EvalResult
from zsq.io import write_json
from zsq.runtime import module_digest

log = logging.getLogger(__name__)

FILE = "teacher-scores.json"
UNCACHED_KINDS = ("imagefolder",)
MAX_ENTRIES = 500


def cache_dir() -> Path:
    if os.environ.get("ZSQ_CACHE_DIR"):
        return Path(os.environ["ZSQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zsq"


def _data_identity(spec: str) -> dict[str, Any]:
    """The spec with its path resolved, and the path's size and modification time."""
    kind, _, rest = spec.partition(":")
    if not rest:
        return {"spec": spec}
    path = Path(rest).expanduser().resolve()
    stat = path.stat() if path.exists() else None
    identity = {"spec": f"{kind}:{path}"}
    if stat is not None:
        identity.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return identity


def score_key(
    teacher: nn.Module,
    spec: str,
    n: int,
    transform: str | None,
    device: torch.device,
    model: dict[str, Any] | None = None,
) -> str:
    parts = {
        "teacher": module_digest(teacher),
        "model": model,  # name, constructor arguments and the input normalisation
        **_data_identity(spec),
        "n": n,
        "transform": transform,
        "device": device.type,
        "zsq": __version__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def teacher_scores(
    teacher: nn.Module,
    spec: str,
    n: int,
    transform: str | None,
    device: torch.device,
    measure: Callable[[], EvalResult],
    model: dict[str, Any] | None = None,
) -> tuple[EvalResult, bool]:
    """The teacher's scores and whether they came from the cache (else ``measure()`` ran and
    its result was kept). A cache that cannot be read or written is skipped with a warning;
    image folders are always measured (their files can change without the folder's date)."""
    if spec.partition(":")[0] in UNCACHED_KINDS:
        return measure(), False
    key = score_key(teacher, spec, n, transform, device, model)
    try:
        path = cache_dir() / FILE
    except RuntimeError:  # no home folder
        return measure(), False
    entries = _read(path)
    entry = entries.get(key)
    if isinstance(entry, list) and len(entry) == 3:
        top1, top5, count = entry
        log.info("teacher top-1 %.2f on %s: measured before (cache %s)", top1, spec, path)
        return EvalResult(top1, top5, count), True
    result = measure()
    entries[key] = [result.top1, result.top5, result.n]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, dict(list(entries.items())[-MAX_ENTRIES:]))
    except OSError as err:
        log.warning("could not keep the teacher's score in %s (%s)", path, err)
    return result, False


def _read(path: Path) -> dict[str, list]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the teacher-score cache %s (%s)", path, err)
        return {}
    return entries if isinstance(entries, dict) else {}
