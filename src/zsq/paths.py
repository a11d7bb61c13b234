"""Where zsq finds the shared real data and pretrained teachers used by tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "ZSQ_SHARED_DATA"


def repo_root() -> Path:
    """The source checkout this file lives in (``<repo>/src/zsq/paths.py`` -> ``<repo>``)."""
    return Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The shared data folder: ``$ZSQ_SHARED_DATA`` if set, else ``<repo>/../shared/data``.

    The folder may not exist (e.g. outside the project's machines); callers check and skip.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (repo_root().parent / "shared" / "data").resolve()
