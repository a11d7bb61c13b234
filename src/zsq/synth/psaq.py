"""PSAQ-ViT images: Gaussian noise optimised so that each block's patch similarities are diverse
(high patch-similarity entropy), the teacher predicts a sampled label, and the image's total
variation stays near a random level.

As the official PSAQ-ViT code (Li et al., 2022, ``zkkli/PSAQ-ViT``) does it, read as facts:

- images start as N(0, 1) noise, one uniform random label each; Adam, lr 0.2 (0.25 for Swin),
  betas (0.5, 0.9), eps 1e-8; 32 images in one batch;
- two rounds of 500 iterations, each with its own schedule: linear warm-up over the first 100
  iterations, then cosine decay to 0; every iteration rolls the image diagonally by a random
  offset of at most 15 pixels (30 in the second round, at 224 px) and flips it horizontally with
  probability 1/2 (DeepInversion's jitter);
- loss ``-sum_blocks entropy + CE(teacher(x), label) + 0.05 * |TV(x) - t|`` with ``t`` drawn once
  from U(2500, 3000) (see :mod:`zsq.synth.vit_losses` for the entropy and TV);
- after each step the pixels are clipped to the valid range of the normalised input.

Adapted to other image sizes (ours): the jitter offsets scale with the height (15 and 30 of 224,
so 2 and 4 pixels at 28 px), warm-up stays a fifth of a round, and ``t``, chosen for 32 images of
3x224x224, scales with the square root of the batch's element count (a TV of L2 norms grows so).
``steps`` counts all iterations (default 1000, split over the two rounds). Clipping needs the
teacher's normalisation (``normalize_mean``/``normalize_std``); without it images are not clipped.

This module also holds :class:`AttentionPoolSource`, the pool machinery that MimiQ shares.
"""

from __future__ import annotations

import logging
import math
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.models.introspect import require, vit_layout
from zsq.quant.attention import attention_modules, expose_attention
from zsq.synth.base import SampleSource, SynthBatch, check_batch_size
from zsq.synth.vit_losses import (
    patch_similarity_entropy,
    total_variation,
)

log = logging.getLogger(__name__)

PSAQ_REFERENCE_NUMEL = 32 * 3 * 224 * 224  # the batch the TV target range was chosen for
PSAQ_TV_RANGE = (2500.0, 3000.0)
PSAQ_JITTER = (15, 30)  # pixels at 224 px, per round
PSAQ_REFERENCE_SIZE = 224


class AttentionPoolSource(SampleSource):
    """A fixed pool of images synthesised against a ViT teacher's attention, with the label each
    image was optimised for.

    The pool (``num_images``) is made on first use in batches of ``batch_size`` (None: all at
    once) with a progress bar; ``cache`` names a safetensors file that keeps it (loaded instead
    of made again when it holds the same options, shape and teacher; the labels travel in its
    report). ``sample`` draws from the pool uniformly with replacement (the global RNG, so a
    resume is exact).

    Targets are the teacher's softmax on the drawn images, not one-hot rows of the labels the
    images were optimised for (those are the batch's ``labels``): PSAQ-ViT only calibrates on
    its images and MimiQ distils with the KL to the teacher alone, so what is consumed is the
    teacher's distribution; and after a short synthesis an image need not carry its label yet.
    """

    pooled = True
    needs: ClassVar[str | None] = "attention"

    trainable = False
    name: ClassVar[str] = ""

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        num_images: int,
        steps: int,
        batch_size: int | None,
        normalize_mean: Sequence[float] | None,
        normalize_std: Sequence[float] | None,
        cache: str | Path | None,
        progress: bool,
    ) -> None:
        super().__init__(teacher, num_classes=num_classes, image_shape=image_shape)
        require(teacher, "attention", self.name)
        self.num_images = check_batch_size(num_images)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ZsqError(
                f"{self.name} steps must be an integer >= 0 (0: the Gaussian noise itself, "
                f"the baseline), got {steps!r}"
            )
        self.steps = steps
        self.batch_size = check_batch_size(batch_size) if batch_size is not None else None
        self.normalize = _normalisation(normalize_mean, normalize_std, self.image_shape[0])
        self.cache = Path(cache) if cache is not None else None
        self.progress = progress
        self.report: dict[str, Any] = {}
        self._pool: tuple[Tensor, Tensor] | None = None

    # --- what subclasses define ----------------------------------------------------------------

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The synthesis options (JSON-able): the cache key and the report hold them; the
        source's own beside :meth:`_pool_options`."""

    def _pool_options(self) -> dict[str, Any]:
        """The options every pool source has."""
        norm = self.normalize
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "normalize_mean": norm[0].flatten().tolist() if norm else None,
            "normalize_std": norm[1].flatten().tolist() if norm else None,
        }

    @abstractmethod
    def _synthesise_batch(
        self, model: nn.Module, images: Tensor, labels: Tensor, bar: tqdm
    ) -> tuple[Tensor, dict[str, Any]]:
        """Optimise ``images`` (a detached start) for ``labels``; the result and a batch report
        (``loss_start``, ``loss_end``, the loss terms at the end)."""

    # --- the pool ------------------------------------------------------------------------------

    def images(self) -> Tensor:
        """The synthesised pool (made, or loaded from ``cache``, on first call)."""
        return self._load_or_synthesise()[0]

    def labels(self) -> Tensor:
        """The label each pool image was optimised for."""
        return self._load_or_synthesise()[1]

    def _load_or_synthesise(self) -> tuple[Tensor, Tensor]:
        """Under torchrun rank 0 reads the cache and every rank gets its pool; a pool made anew
        is split over the ranks by batch and gathered, so every rank holds the same images."""
        from zsq import distributed

        if self._pool is None:
            made = distributed.on_main(self._load)
            if made is None:
                made = self._synthesise()
                distributed.on_main(lambda: self._save(made))
            images, labels, self.report = made
            self._pool = images.to(self.device), labels.to(self.device)
        return self._pool

    def _cache_key(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "num_images": self.num_images,
            "image_shape": list(self.image_shape),
            **self.options(),
        }

    def _load(self) -> tuple[Tensor, Tensor, dict[str, Any]] | None:
        from zsq.synth.cache import load_images

        if self.cache is None:
            return None
        cached = load_images(self.cache, self._cache_key(), self.teacher)
        if cached is None:
            return None
        images, report = cached
        log.info("%s: %d images loaded from %s", self.name, len(images), self.cache)
        return images, torch.tensor(report["labels"], dtype=torch.long), report

    def _save(self, made: tuple[Tensor, Tensor, dict[str, Any]]) -> None:
        from zsq.synth.cache import save_images

        images, _, report = made
        if self.cache is not None:
            save_images(self.cache, images, self._cache_key(), self.teacher, report)

    @torch.enable_grad()  # callers may sample under no_grad; synthesis needs image gradients
    def _synthesise(self) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The pool in batches; under torchrun each rank makes every ``size``-th batch (from its
        own RNG stream) and the batches are gathered in order."""
        from zsq import distributed

        current = distributed.world()
        model = expose_attention(self.teacher).eval()  # a float copy keeping attention maps
        for p in model.parameters():
            p.requires_grad_(False)
        batch = self.batch_size or self.num_images
        starts = list(range(0, self.num_images, batch))
        mine = [k for k in range(len(starts)) if k % current.size == current.rank]
        bar = tqdm(
            total=len(mine) * self.steps,
            desc=f"{self.name} synthesis",
            unit="step",
            disable=not self.progress,
        )
        made: dict[int, tuple[Tensor, Tensor, dict[str, Any]]] = {}
        started = time.perf_counter()
        try:
            for k in mine:
                size = min(batch, self.num_images - starts[k])
                labels = torch.randint(0, self.num_classes, (size,), device=self.device)
                noise = torch.randn(size, *self.image_shape, device=self.device)
                images, report = (
                    self._synthesise_batch(model, noise, labels, bar)
                    if self.steps
                    else (noise, {})  # the Gaussian-noise baseline: the same pool, unoptimised
                )
                made[k] = images.cpu(), labels.cpu(), {"images": size, **report}
        finally:
            bar.close()
        for part in distributed.gather_objects(made):
            made.update(part)
        ordered = [made[k] for k in range(len(starts))]
        images = torch.cat([m[0] for m in ordered])
        labels = torch.cat([m[1] for m in ordered])
        report = {
            "source": self.name,
            "options": self.options(),
            "num_images": self.num_images,
            "batches": [m[2] for m in ordered],
            "seconds": round(time.perf_counter() - started, 3),
            "labels": labels.tolist(),
        }
        return images, labels, report

    def _clip(self, images: Tensor) -> None:
        """Keep pixels inside [0, 1] before normalisation (in place), when it is known."""
        if self.normalize is not None:
            mean, std = (t.to(images.device) for t in self.normalize)
            with torch.no_grad():
                images.clamp_(min=-mean / std, max=(1 - mean) / std)

    @torch.no_grad()
    def sample(self, batch_size: int) -> SynthBatch:
        check_batch_size(batch_size)
        self._ensure_teacher_eval()
        pool, pool_labels = self._load_or_synthesise()
        index = torch.randint(0, len(pool), (batch_size,), device=pool.device)
        images = pool[index]
        logits = self.teacher(images)
        self._check_logits(logits)
        return SynthBatch(images, torch.softmax(logits.float(), dim=1), pool_labels[index])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_images={self.num_images}, steps={self.steps}"


def _normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> tuple[Tensor, Tensor] | None:
    """Per-channel (1, C, 1, 1) mean and std, or None when neither is given."""
    if mean is None and std is None:
        return None
    values = []
    for label, given, default in (("normalize_mean", mean, 0.0), ("normalize_std", std, 1.0)):
        given = [default] if given is None else [float(v) for v in given]
        if len(given) not in (1, channels):
            expected = "1 value" if channels == 1 else f"1 or {channels} values"
            raise ZsqError(
                f"{label} needs {expected} for {channels}-channel images, got {len(given)}"
            )
        values.append(torch.tensor(given * (channels // len(given))).reshape(1, channels, 1, 1))
    if (values[1] <= 0).any():
        raise ZsqError("normalize_std values must be > 0")
    return values[0], values[1]


def loss_numbers(terms: dict[str, Tensor]) -> dict[str, float]:
    """Detached loss terms as rounded floats (a host sync: once per batch end and start)."""
    return {k: round(float(v.detach()), 6) for k, v in terms.items()}


def batch_report(first: dict[str, float], last: dict[str, float]) -> dict[str, Any]:
    """``loss_start``/``loss_end`` and the other terms at the first and the last step."""
    start, end = dict(first), dict(last)
    return {
        "loss_start": start.pop("loss", None),
        "loss_end": end.pop("loss", None),
        "terms_start": start,
        "terms_end": end,
    }


def round_lengths(steps: int, rounds: int) -> list[int]:
    """``steps`` split into ``rounds`` near-equal rounds (the first ones longer), none empty."""
    rounds = min(rounds, steps)
    return [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]


def warmup_cosine(base_lr: float, step: int, length: int, warmup: int) -> float:
    """PSAQ-ViT's schedule within a round: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(length - warmup, 1))) * base_lr


class _AttentionOutputs:
    """Records each attention module's per-head output ``attention @ v`` averaged over heads:
    the input of its ``norm`` (identity in timm's ViT) is the heads' outputs side by side."""

    def __init__(self, model: nn.Module) -> None:
        self.features: list[Tensor] = []
        self.handles = []
        for _, module in attention_modules(model):
            self.handles.append(module.norm.register_forward_pre_hook(self._hook(module.num_heads)))

    def _hook(self, heads: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self.features.append(x.reshape(*x.shape[:-1], heads, -1).mean(-2))

        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class PsaqSource(AttentionPoolSource):
    """A pool of PSAQ-ViT images (module doc), labelled by the teacher (softmax targets)."""

    name = "psaq"

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        num_images: int = 32,
        steps: int = 1000,
        lr: float = 0.2,
        batch_size: int | None = 32,
        tv_weight: float = 0.05,
        jitter: bool = True,
        flip: bool = True,
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
            raise ZsqError(f"psaq lr must be > 0, got {lr}")
        if not tv_weight >= 0:
            raise ZsqError(f"psaq tv_weight must be >= 0, got {tv_weight}")
        self.lr = float(lr)
        self.tv_weight = float(tv_weight)
        self.jitter = bool(jitter)
        self.flip = bool(flip)

    def options(self) -> dict[str, Any]:
        return {
            **self._pool_options(),
            "lr": self.lr,
            "tv_weight": self.tv_weight,
            "jitter": self.jitter,
            "flip": self.flip,
        }

    def _synthesise_batch(
        self, model: nn.Module, images: Tensor, labels: Tensor, bar: tqdm
    ) -> tuple[Tensor, dict[str, Any]]:
        images = images.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=self.lr, betas=(0.5, 0.9), eps=1e-8)
        scale = math.sqrt(images.numel() / PSAQ_REFERENCE_NUMEL)
        low, high = PSAQ_TV_RANGE
        tv_target = float(torch.empty(()).uniform_(low, high)) * scale
        prefix, _ = vit_layout(model)
        recorder = _AttentionOutputs(model)
        first: dict[str, float] | None = None
        try:
            for r, length in enumerate(round_lengths(self.steps, len(PSAQ_JITTER))):
                limit = round(PSAQ_JITTER[r] * self.image_shape[1] / PSAQ_REFERENCE_SIZE)
                for step in range(length):
                    lr = warmup_cosine(self.lr, step, length, max(1, round(length / 5)))
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    terms = self._step(model, recorder, images, labels, limit, tv_target, prefix)
                    loss = terms["loss"]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    self._clip(images)
                    first = first or loss_numbers(terms)
                    bar.update(1)
        finally:
            recorder.close()
        report = batch_report(first or {}, loss_numbers(terms))
        report["tv_target"] = round(tv_target, 4)
        return images.detach(), report

    def _step(
        self,
        model: nn.Module,
        recorder: _AttentionOutputs,
        images: Tensor,
        labels: Tensor,
        limit: int,
        tv_target: float,
        prefix: int | None,
    ) -> dict[str, Tensor]:
        """One forward of PSAQ-ViT's loss on a jittered, maybe flipped view of ``images``."""
        view = images
        if self.jitter and limit > 0:
            offset = int(torch.randint(-limit, limit + 1, ()))
            view = torch.roll(view, shifts=(offset, offset), dims=(2, 3))
        if self.flip and float(torch.rand(())) < 0.5:
            view = torch.flip(view, dims=(3,))
        recorder.features = []
        logits = model(view)
        self._check_logits(logits)
        prefix = 1 if prefix is None else prefix
        entropy = torch.stack([patch_similarity_entropy(f, prefix) for f in recorder.features])
        entropy = entropy.sum()
        recorder.features = []
        ce = F.cross_entropy(logits.float(), labels)
        tv = (total_variation(view) - tv_target).abs()
        loss = -entropy + ce + self.tv_weight * tv
        return {"loss": loss, "entropy": entropy.detach(), "ce": ce.detach(), "tv": tv.detach()}
