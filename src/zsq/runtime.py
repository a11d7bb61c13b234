"""Device choice, seeding and RNG state capture (for exact resume)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from zsq.errors import ZsqError


def resolve_device(name: str | torch.device | int | None = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; an unavailable CUDA device is an error.
    A ``torch.device`` or a GPU index is checked the same way."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ZsqError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ZsqError(f"device {name!r} requested but CUDA is not available; use device 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ZsqError(
            f"device {name!r} requested but there are {torch.cuda.device_count()} GPU(s); "
            "use cuda:0 to cuda:N-1"
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple:
    """NumPy's RNG state with the key array as a tensor, so ``weights_only`` loading accepts it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a checkpoint from a machine with more GPUs: the visible devices' states
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import os

    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def module_digest(module: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and bytes), independent of device."""
    from zsq.io import sha256_tensors

    return sha256_tensors(module.state_dict())
