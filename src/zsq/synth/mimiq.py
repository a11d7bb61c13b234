"""MimiQ images: noise optimised so that, in every layer and for every spatial query patch, the
attention maps of the different heads align, while the teacher predicts a sampled label.

MimiQ (Choi et al., AAAI 2025, arXiv 2407.20021) observes that real images give highly aligned
attention maps across heads and earlier synthetic ones do not. Facts used (MimiQ's code is not
public; ``../shared/REFERENCE.md`` records them from third-party descriptions): AdamW, lr 0.1,
2000 steps per batch of 16 images; loss ``sum_layers mean(1 - SSIM^2 over head pairs and query
patches) + CE(teacher(x), label) + 2.5e-5 * TV(x)``, the square taken with its sign so that
anti-aligned heads are not rewarded (see :mod:`zsq.synth.vit_losses`).

Choices of ours where no fact was found: images start as N(0, 1) noise with one uniform random
label each (as PSAQ-ViT, which MimiQ compares against); the alignment and CE terms weigh 1;
AdamW keeps PyTorch's default weight decay (0.01) and a constant lr, with no jitter; the pool
holds 32 images by default, as many as PSAQ-ViT's, so the two compare like for like. Pixels are
clipped to the valid range when the teacher's normalisation is given, as for PSAQ-ViT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.models.introspect import vit_layout
from zsq.quant.attention import attention_maps
from zsq.synth.psaq import AttentionPoolSource, batch_report, loss_numbers
from zsq.synth.vit_losses import head_alignment_loss, total_variation

log = logging.getLogger(__name__)


class MimiqSource(AttentionPoolSource):
    """A pool of MimiQ images (module doc), labelled by the teacher (softmax targets)."""

    name = "mimiq"

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        num_images: int = 32,
        steps: int = 2000,
        lr: float = 0.1,
        batch_size: int | None = 16,
        align_weight: float = 1.0,
        tv_weight: float = 2.5e-5,
        weight_decay: float = 0.01,
        normalize_mean: Sequence[float] | None = None,
        normalize_std: Sequence[float] | None = None,
        cache: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(
            teacher,
            num_classes=num_classes,
            image_shape=image_shape,
            num_images=num_images,
            steps=steps,
            batch_size=batch_size,
            normalize_mean=normalize_mean,
            normalize_std=normalize_std,
            cache=cache,
            progress=progress,
        )
        if not lr > 0:
            raise ZsqError(f"mimiq lr must be > 0, got {lr}")
        for label, value in (
            ("align_weight", align_weight),
            ("tv_weight", tv_weight),
            ("weight_decay", weight_decay),
        ):
            if not value >= 0:
                raise ZsqError(f"mimiq {label} must be >= 0, got {value}")
        self.lr = float(lr)
        self.align_weight = float(align_weight)
        self.tv_weight = float(tv_weight)
        self.weight_decay = float(weight_decay)

    def options(self) -> dict[str, Any]:
        return {
            **self._pool_options(),
            "lr": self.lr,
            "align_weight": self.align_weight,
            "tv_weight": self.tv_weight,
            "weight_decay": self.weight_decay,
        }

    def _synthesise_batch(
        self, model: nn.Module, images: Tensor, labels: Tensor, bar: tqdm
    ) -> tuple[Tensor, dict[str, Any]]:
        images = images.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([images], lr=self.lr, weight_decay=self.weight_decay)
        layout = vit_layout(model)
        first: dict[str, float] | None = None
        for _ in range(self.steps):
            terms = self._loss(model, images, labels, layout)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            self._clip(images)
            first = first or loss_numbers(terms)
            bar.update(1)
        return images.detach(), batch_report(first or {}, loss_numbers(terms))

    def _loss(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        layout: tuple[int | None, tuple[int, int] | None],
    ) -> dict[str, Tensor]:
        logits = model(images)
        self._check_logits(logits)
        maps = attention_maps(model)
        align = torch.stack([head_alignment_loss(a, *layout) for a in maps.values()]).sum()
        ce = F.cross_entropy(logits.float(), labels)
        tv = total_variation(images)
        loss = self.align_weight * align + ce + self.tv_weight * tv
        return {"loss": loss, "align": align.detach(), "ce": ce.detach(), "tv": tv.detach()}
