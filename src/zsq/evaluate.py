"""Top-1 / top-5 accuracy of a classifier on a real dataset (measurement only, never training)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from zsq.distributed import World, sum_counts
from zsq.distributed import world as dist_world
from zsq.errors import ZsqError
from zsq.models import input_channels
from zsq.runtime import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracies in percent (0-100) over ``n`` samples."""

    top1: float
    top5: float
    n: int

    def __str__(self) -> str:
        return f"top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%  (n={self.n})"


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    distributed: bool = False,
) -> EvalResult:
    """Run ``model`` over ``dataset`` in order and count top-1/top-5 hits.

    The model is moved to ``device`` (CUDA when available if None) and put in eval mode for the
    run; its previous train/eval mode is restored afterwards. Top-5 becomes top-k with
    k = min(5, number of classes) so small-class-count models still get a meaningful number.
    Measuring leaves the random number generators as it found them, so a training run that
    evaluates on schedule ends with the same model as one that does not. ``distributed=True``
    under torchrun: every rank of the process group calls this, scores every ``size``-th image
    from its rank on, and all get the counts summed over ranks (the single-process result).
    """
    if len(dataset) == 0:
        raise ZsqError("cannot evaluate on an empty dataset; check the dataset spec and split")
    if batch_size < 1:
        raise ZsqError(f"batch_size must be >= 1, got {batch_size}")
    _check_channels(model, dataset)
    device = resolve_device(device)
    current = dist_world() if distributed else World()
    if current.active:
        dataset = Subset(dataset, range(current.rank, len(dataset), current.size))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # the loader's seed draw must not advance the global RNG
    )
    was_training = model.training
    model.to(device).eval()
    start = time.perf_counter()
    try:
        with _rng_untouched(device):
            hits1, hits5, seen = _count_hits(model, loader, device, progress)
        if current.active:
            hits1, hits5, seen = sum_counts([hits1, hits5, seen])
    finally:
        model.train(was_training)
    result = EvalResult(100.0 * hits1 / seen, 100.0 * hits5 / seen, seen)
    logger.info("evaluated %s in %.1fs on %s", result, time.perf_counter() - start, device)
    return result


def _check_channels(model: nn.Module, dataset: Dataset) -> None:
    """A channel mismatch would surface as a convolution's shape error; say it plainly."""
    expected = input_channels(model)
    image = dataset[0][0]
    if expected is None or not isinstance(image, torch.Tensor) or image.dim() != 3:
        return
    got = image.shape[0]
    if got != expected:
        raise ZsqError(
            f"the dataset's images have {got} channel(s) but the model's first layer takes "
            f"{expected}; use {expected}-channel data, or the model built for this data"
        )


@contextlib.contextmanager
def _rng_untouched(device: torch.device) -> Iterator[None]:
    """Restore the CPU (and this CUDA device's) RNG state after the block, whatever it drew."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        yield


@torch.no_grad()
def _count_hits(
    model: nn.Module, loader: DataLoader, device: torch.device, progress: bool
) -> tuple[int, int, int]:
    hits1 = hits5 = seen = 0
    for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = _logits(model(images))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct = top.eq(labels.view(-1, 1))
        hits1 += int(correct[:, 0].sum())
        hits5 += int(correct.any(dim=1).sum())
        seen += labels.numel()
    return hits1, hits5, seen


def _logits(output: object) -> torch.Tensor:
    """Plain tensor, or the main output of models returning tuples / ``.logits`` objects."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ZsqError(
        f"model returned {type(output).__name__}, not a logits tensor; wrap it so forward returns "
        "(batch, classes) logits"
    )
