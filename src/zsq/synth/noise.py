"""Gaussian-noise samples labelled by the teacher: the zero-effort baseline.

Useful for tests, ablations ("does the generator matter?") and activation-range calibration. It
needs nothing from the teacher but its forward, so it also works for teachers without BatchNorm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from zsq.synth.base import SampleSource, SynthBatch, check_batch_size

log = logging.getLogger(__name__)


class GaussianSource(SampleSource):
    """Images ~ N(0, I) in the teacher's input shape; targets = teacher softmax, labels = argmax."""

    trainable = False

    def __init__(self, teacher: nn.Module, *, num_classes: int, image_shape: Sequence[int]) -> None:
        super().__init__(teacher, num_classes=num_classes, image_shape=image_shape)

    @torch.no_grad()
    def sample(self, batch_size: int) -> SynthBatch:
        check_batch_size(batch_size)
        self._ensure_teacher_eval()
        images = torch.randn(batch_size, *self.image_shape, device=self.device)
        logits = self.teacher(images)
        self._check_logits(logits)
        targets = torch.softmax(logits.float(), dim=1)
        return SynthBatch(images, targets, targets.argmax(dim=1))

    def step(self, batch_size: int) -> tuple[SynthBatch, dict[str, Tensor]]:
        return self.sample(batch_size), {}
