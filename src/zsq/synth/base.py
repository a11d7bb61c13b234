"""The one interface every synthetic-sample source implements.

A source hands the trainer batches of (images, soft targets, optional hard labels) in the
teacher's input space. Trainable sources (GDFQ, Qimera, ARC generators) also update themselves
against the frozen teacher in ``step``; non-trainable ones (Gaussian noise, ZeroQ's distilled
images once made) just ``sample``.

Randomness comes only from the global torch RNG of the source's device, so the trainer's
RNG-state checkpointing is enough for an exact resume.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from zsq.errors import ConfigError, ZsqError
from zsq.options import Rule

log = logging.getLogger(__name__)

ImageShape = tuple[int, int, int]


@dataclass
class SynthBatch:
    """One synthetic batch.

    ``images``: (B, C, H, W) in the teacher's (normalised) input space, detached.
    ``targets``: (B, num_classes) target probabilities, rows sum to 1 (one-hot for hard labels).
    ``labels``: (B,) hard labels when the batch has them (None for e.g. mixed-label batches).
    """

    images: Tensor
    targets: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.targets.dim() != 2 or self.targets.shape[0] != n:
            raise ValueError(
                f"targets must be (B={n}, num_classes), got {tuple(self.targets.shape)}"
            )
        if self.labels is not None and tuple(self.labels.shape) != (n,):
            raise ValueError(f"labels must be (B={n},), got {tuple(self.labels.shape)}")

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SynthBatch:
        labels = self.labels
        if labels is not None:
            labels = labels.to(device, non_blocking=non_blocking)
        return SynthBatch(
            self.images.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            labels,
        )


class SampleSource(nn.Module, ABC):
    """Where synthetic samples come from.

    The teacher is *held*, not owned: it is not a registered submodule, so ``state_dict()`` holds
    only the source's own state (e.g. the generator) and ``.to()`` does not move the teacher.
    Trainable sources set ``self.optimizer`` so the trainer can attach LR schedulers and save it.
    Building a source puts the teacher in eval mode (BN must normalise with running statistics).
    ``forward_precision`` returns the context the source's forward passes run in (the trainer
    sets it to bf16 autocast for ``--precision bf16``); losses and backward passes run outside it.
    """

    trainable: ClassVar[bool] = False
    pooled: ClassVar[bool] = False  # a fixed pool of num_images images, made once
    batched: ClassVar[bool] = False  # a pool made batch by batch, each kept (PooledSource)
    # what the source needs of the teacher: 'batchnorm', 'attention' (zsq.models.introspect)
    needs: ClassVar[str | None] = None
    # each constructor option's rule, so its value is checked before any work (build_source)
    OPTIONS: ClassVar[Mapping[str, Rule]] = {}

    def __init__(self, teacher: nn.Module, *, num_classes: int, image_shape: Sequence[int]) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.image_shape: ImageShape = check_image_shape(image_shape)
        self.optimizer: torch.optim.Optimizer | None = None
        self.forward_precision: Callable[[], contextlib.AbstractContextManager] = (
            contextlib.nullcontext
        )
        # object.__setattr__ keeps the teacher out of this module's children (see class doc).
        object.__setattr__(self, "teacher", teacher)
        teacher.eval()

    @property
    def device(self) -> torch.device:
        """Device the source draws its randomness on (its own parameters', else the teacher's)."""
        return module_device(self, default=module_device(self.teacher))

    @abstractmethod
    def sample(self, batch_size: int) -> SynthBatch:
        """A batch without updating the source (no autograd graph)."""

    def step(self, batch_size: int) -> tuple[SynthBatch, dict[str, Tensor]]:
        """A batch, plus one update of a trainable source against the frozen teacher.

        Returns the detached batch and the loss terms as 0-d detached tensors (not floats: a
        ``.item()`` here would force a host sync every step; the trainer converts when it logs).
        A non-trainable source just samples and returns no loss terms.
        """
        return self.sample(batch_size), {}

    def close(self) -> None:
        """Release hooks the source put on the teacher. The source is unusable afterwards."""

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, image_shape={self.image_shape}"

    def _ensure_teacher_eval(self) -> None:
        """Someone may have called ``.train()`` on a shared model; BN must use running stats."""
        if self.teacher.training:
            log.warning("teacher was in train mode; putting it back in eval mode")
            self.teacher.eval()

    def _check_logits(self, logits: Tensor) -> None:
        """Shape-only check (no host sync) that the teacher's classes match ``num_classes``."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ZsqError(
                f"teacher returned logits of shape {tuple(logits.shape)} but num_classes="
                f"{self.num_classes}; pass the teacher's number of classes"
            )


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: generator losses backprop *through* the teacher."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return default if default is not None else torch.device("cpu")


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot rows via scatter: unlike ``F.one_hot`` it never range-checks (a host sync)."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.unsqueeze(1), 1.0)


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"«num_classes» must be a positive integer, got {num_classes!r}")
    return num_classes


def check_image_shape(image_shape: Sequence[int]) -> ImageShape:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ZsqError(
            f"«image_shape» must be (channels, height, width) of positive ints, got "
            f"{image_shape!r:.60}"
        )
    return shape  # type: ignore[return-value]


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ZsqError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size
