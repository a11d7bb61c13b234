"""ZeroQ's sensitivity measure, shared by the weight and the activation allocators: the mean KL
from the teacher's outputs to a partly quantized model's, over the synthetic images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zsq.numerics.losses import kl_to_teacher

EVAL_BATCH = 64  # images per forward while scoring


def teacher_logits(teacher: nn.Module, images: Tensor) -> list[Tensor]:
    """The teacher's logits on ``images``, one tensor per ``EVAL_BATCH`` chunk."""
    with torch.no_grad():
        return [teacher(x) for x in images.split(EVAL_BATCH)]


@torch.no_grad()
def mean_kl(model: nn.Module, images: Tensor, targets: list[Tensor]) -> float:
    """KL(teacher || model) at temperature 1, the mean per image (``targets``: the teacher's
    logits from :func:`teacher_logits`)."""
    total = sum(
        float(kl_to_teacher(model(x), t, 1.0, "batchmean")) * len(x)
        for x, t in zip(images.split(EVAL_BATCH), targets, strict=True)
    )
    return total / len(images)
