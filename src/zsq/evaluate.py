"""Top-1 / top-5 accuracy of a classifier on a real dataset (measurement only, never training)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from zsq.errors import ZsqError
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
) -> EvalResult:
    """Run ``model`` over ``dataset`` in order and count top-1/top-5 hits.

    The model is moved to ``device`` (CUDA when available if None) and put in eval mode for the
    run; its previous train/eval mode is restored afterwards. Top-5 becomes top-k with
    k = min(5, number of classes) so small-class-count models still get a meaningful number.
    """
    if len(dataset) == 0:
        raise ZsqError("cannot evaluate on an empty dataset; check the dataset spec and split")
    if batch_size < 1:
        raise ZsqError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.to(device).eval()
    start = time.perf_counter()
    try:
        hits1, hits5, seen = _count_hits(model, loader, device, progress)
    finally:
        model.train(was_training)
    result = EvalResult(100.0 * hits1 / seen, 100.0 * hits5 / seen, seen)
    logger.info("evaluated %s in %.1fs on %s", result, time.perf_counter() - start, device)
    return result


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
