"""Distillation losses: KL to the teacher with temperature, and (soft-label) cross-entropy."""

from __future__ import annotations

import warnings
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from zsq.errors import ZsqError

KLReduction = Literal["mean", "batchmean"]


def kl_to_teacher(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 20.0,
    reduction: KLReduction = "mean",
) -> Tensor:
    """KL(teacher_T || student_T) * T^2.

    ``mean`` (the reference's, and our default) divides the summed KL by batch x classes;
    ``batchmean`` divides by the batch only, the true KL per sample: with it the effective
    learning rate is ``num_classes`` times larger.
    """
    if reduction not in ("mean", "batchmean"):
        raise ZsqError(f"KL reduction {reduction!r} must be 'mean' or 'batchmean'")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    with warnings.catch_warnings():  # torch warns that 'mean' is not the true KL: we know
        warnings.simplefilter("ignore", UserWarning)
        kl = F.kl_div(log_p_student, p_teacher, reduction=reduction)
    return kl * temperature**2


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against target probabilities (equals plain CE for one-hot targets)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
