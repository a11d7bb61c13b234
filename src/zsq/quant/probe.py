"""One forward pass for hooks to watch, leaving the model as it was."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from zsq.errors import ZsqError
from zsq.quant.modules import ActQuantizer


def inspect_forward(model: nn.Module, image_shape: Sequence[int]) -> Any:
    """One forward on zeros at batch 1 for hooks to watch, leaving the model as it was: eval
    mode, activation observers paused, no gradients and the RNG forked, modes restored after.
    Returns the output; a failing forward is an error naming the shape."""
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    x = torch.zeros((1, *image_shape), dtype=dtype, device=param.device)
    training = {m: m.training for m in model.modules()}
    observing = {aq: aq.observing for aq in model.modules() if isinstance(aq, ActQuantizer)}
    devices = []
    if param.device.type == "cuda":
        index = param.device.index
        devices = [torch.cuda.current_device() if index is None else index]
    try:
        model.eval()
        for aq in observing:
            aq.observing = False
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, AssertionError) as exc:  # timm asserts on input sizes
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZsqError(
            f"the model's forward failed on a 1x{'x'.join(map(str, image_shape))} input "
            f"({first_line}); pass the model's input shape (channels, height, width)"
        ) from exc
    finally:
        for module, mode in training.items():
            module.training = mode
        for aq, mode in observing.items():
            aq.observing = mode
