"""A source that makes a fixed pool of images once (distilled from the teacher), keeps it in a
cache file if asked, and samples from it: ZeroQ's and Genie's distilled data."""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zsq.synth.base import SampleSource, SynthBatch, check_batch_size
from zsq.synth.cache import load_batches, load_images, save_batches, save_images

log = logging.getLogger(__name__)


class PooledSource(SampleSource):
    """A fixed pool of ``num_images`` images, labelled by the teacher (softmax targets).

    The pool is made on first use; ``cache`` names a safetensors file that keeps it: when the
    file exists and was made with the same options, shape and teacher, it is loaded instead of
    made again. ``sample`` draws images from the pool uniformly with replacement (the global RNG,
    so a resume is exact). Subclasses make the pool (:meth:`make`) and say what identifies it
    (:meth:`key`)."""

    trainable = False
    pooled = True  # batched sources: make() keeps each finished batch (see keep_batches)

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        num_images: int,
        cache: str | Path | None,
        progress: bool,
    ) -> None:
        super().__init__(teacher, num_classes=num_classes, image_shape=image_shape)
        self.num_images = check_batch_size(num_images)
        self.cache = Path(cache) if cache is not None else None
        self.progress = progress
        self.report: dict[str, Any] = {}
        self._pool: Tensor | None = None
        self._batches: Path | None = None
        self._on_batch: Callable[[], None] | None = None

    def keep_batches(self, path: Path, on_saved: Callable[[], None] | None = None) -> None:
        """Keep the batches of the pool in ``path`` as they are made, and continue from the ones
        found there (a source with ``batched``; others make their pool in one piece);
        ``on_saved`` runs after each save (a run marks itself resumable)."""
        self._batches, self._on_batch = Path(path), on_saved

    def batches_made(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The tensors of the batches an interrupted session kept (``images`` among them) and
        their report (the random state set to what it was after them), None when none."""
        if self._batches is None:
            return None
        made = load_batches(self._batches, self.key(), self.teacher)
        if made is not None:
            count = len(made[0]["images"])
            log.info("%s: %d images made before, continuing", self.key()["source"], count)
        return made

    def batch_made(self, tensors: dict[str, Tensor], report: dict[str, Any]) -> None:
        """Keep the images made so far (when asked to, see :meth:`keep_batches`)."""
        if self._batches is not None:
            save_batches(self._batches, tensors, self.key(), self.teacher, report)
            if self._on_batch is not None:
                self._on_batch()

    @abstractmethod
    def make(self) -> tuple[Tensor, dict[str, Any]]:
        """The pool (on the teacher's device) and a report of how it was made."""

    @abstractmethod
    def key(self) -> dict[str, Any]:
        """What made the pool (the source, its options, the image shape): a cache file made
        with another key is refused."""

    def images(self) -> Tensor:
        """The pool (made, or loaded from ``cache``, on first call)."""
        if self._pool is None:
            self._pool = self._load_or_make()
        return self._pool

    def _load_or_make(self) -> Tensor:
        key = self.key()
        if self.cache is not None:
            cached = load_images(self.cache, key, self.teacher)
            if cached is not None:
                images, self.report = cached
                log.info("%s: %d images loaded from %s", key["source"], len(images), self.cache)
                return images.to(self.device)
        images, self.report = self.make()
        if self.cache is not None:
            save_images(self.cache, images, key, self.teacher, self.report)
        return images

    @torch.no_grad()
    def sample(self, batch_size: int) -> SynthBatch:
        check_batch_size(batch_size)
        self._ensure_teacher_eval()
        pool = self.images()
        index = torch.randint(0, len(pool), (batch_size,), device=pool.device)
        images = pool[index]
        logits = self.teacher(images)
        self._check_logits(logits)
        targets = torch.softmax(logits.float(), dim=1)
        return SynthBatch(images, targets, targets.argmax(dim=1))
