"""ZeroQ distilled data: input images optimised until the teacher's BatchNorm layers see their
training statistics.

As the official ZeroQ code (Cai et al., CVPR 2020) does it, read as facts:

- images start as ZeroQ's "uniform" noise, ``(randint(0, 255) - 127.5) / 5418.75`` (a small
  spread around 0; ``init="gaussian"`` starts from N(0, 1) instead);
- every BN layer's *input* is compared **per image**: each image's per-channel mean over the
  spatial positions and its per-channel std ``sqrt(var + eps)`` (unbiased variance) against the
  layer's ``running_mean`` and ``sqrt(running_var + eps)``; the squared L2 distance is summed over
  images and channels and divided by the batch size, summed over layers, plus the same term for
  the image itself against mean 0, std 1 per channel;
- Adam, lr 0.5, 500 steps, ``ReduceLROnPlateau`` on the loss (patience 100, min lr 1e-4).

``precision="bf16"`` (ours, not the reference's) runs the teacher's forward under bfloat16
autocast and keeps the statistics and the loss in float32: about 3x faster on a CPU with
AVX512-BF16 or a GPU. Images are kept channels-last, which only changes speed.

The loss is a sum of per-image terms, so images are independent of the batch they are distilled
in (only the plateau schedule sees the batch's total). Without ``batch_size``, zsq distils the
whole set in one pass on a GPU (halving on out-of-memory) and, on a CPU, in equal passes whose
largest float32 BN input stays under 16 MiB (``cpu_pass_size``): with glibc, blocks over 32 MiB
are always mmapped, so tensors that large are freed and page-faulted anew at every step; 512
CIFAR images in one pass ran 1.8x slower per step than two passes of 256.

ZeroQ hooks the output of the convolution before each BN; the BN's input, hooked here, is the
same tensor and also works when something else feeds the BN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.models.introspect import batchnorm_layers, require
from zsq.quant import inspect_forward
from zsq.synth.base import check_batch_size
from zsq.synth.pool import PooledSource

log = logging.getLogger(__name__)

INITS = ("zeroq", "gaussian")
PRECISIONS = ("fp32", "bf16")
_EPS = 1e-6  # ZeroQ's eps inside the square roots
CPU_PASS_BYTES = 16 * 2**20  # largest float32 BN input of one CPU pass (see the module docstring)


@dataclass(frozen=True)
class ZeroQOptions:
    """How images are distilled (ZeroQ's defaults). ``batch_size`` None: chosen for the device
    (all in one pass on a GPU, ``cpu_pass_size`` on a CPU)."""

    steps: int = 500
    lr: float = 0.5
    patience: int = 100
    min_lr: float = 1e-4
    init: str = "zeroq"
    batch_size: int | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ZsqError(f"zeroq steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ZsqError(f"zeroq lr must be > 0, got {self.lr}")
        if self.init not in INITS:
            raise ZsqError(f"zeroq init {self.init!r} is unknown; use one of {', '.join(INITS)}")
        if self.batch_size is not None:
            check_batch_size(self.batch_size)
        if self.precision not in PRECISIONS:
            raise ZsqError(
                f"zeroq precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}"
            )


def cpu_pass_size(
    teacher: nn.Module, layers: list[nn.Module], num_images: int, image_shape: Sequence[int]
) -> int:
    """Images per pass on a CPU: equal passes, each keeping its largest float32 BN input within
    ``CPU_PASS_BYTES`` (one side-effect-free inspection forward measures them)."""
    recorder = _BnInputs(layers)
    try:
        inspect_forward(teacher, image_shape)
        per_image = max(x[0].numel() for _, x in recorder.inputs) * 4
    finally:
        recorder.close()
    fits = max(1, CPU_PASS_BYTES // per_image)
    passes = math.ceil(num_images / fits)
    return math.ceil(num_images / passes)


def initial_images(n: int, image_shape: Sequence[int], init: str, device: torch.device) -> Tensor:
    if init == "gaussian":
        return torch.randn(n, *image_shape, device=device)
    codes = torch.randint(0, 255, (n, *image_shape), device=device).float()
    return (codes - 127.5) / 5418.75


class _PerImageMoments(torch.autograd.Function):
    """Per-image, per-channel E[x] and E[x^2] over the spatial positions with a one-pass
    backward: autograd's graph for the same two reductions costs as much as the convolutions
    here (the statistics of every BN input are taken at every step)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x)
        x = x.float()  # bf16 inputs (precision="bf16") are summed in float32
        return x.mean((2, 3)), x.square().mean((2, 3))

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor, grad_sq: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        n = x.shape[2] * x.shape[3]
        g1 = (grad_mean / n)[:, :, None, None]
        g2 = (grad_sq * (2.0 / n))[:, :, None, None]
        return torch.addcmul(g1, g2, x.float()).to(x.dtype)


def per_image_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and std ``sqrt(var + eps)`` (unbiased variance) over the
    spatial positions, as ZeroQ computes them; a 2-D input (N, C) has no positions and gives
    batch statistics."""
    if x.dim() == 2:
        var, mean = torch.var_mean(x.float(), dim=0, keepdim=True)
        return mean, torch.sqrt(var + _EPS)
    if x.dim() != 4:
        x = x.flatten(2).unsqueeze(-1)
    n = x.shape[2] * x.shape[3]
    mean, mean_sq = _PerImageMoments.apply(x)
    var = (mean_sq - mean.square()).clamp(min=0) * (n / max(n - 1, 1))
    return mean, torch.sqrt(var + _EPS)


class _BnInputs:
    """Records each BN layer's input during a forward (forward pre-hooks, removed by close())."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.inputs: list[tuple[nn.Module, Tensor]] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in layers]

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.inputs.append((module, args[0]))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def zeroq_loss(images: Tensor, recorded: list[tuple[nn.Module, Tensor]]) -> Tensor:
    """ZeroQ's loss: per-image mean/std distances to the BN statistics, and to N(0, 1) for the
    image (each ``||target - stat||^2 / batch``)."""
    n = images.shape[0]
    terms = []
    for layer, x in recorded:
        mean, std = per_image_stats(x)
        target_std = torch.sqrt(layer.running_var.float() + _EPS)
        terms.append((mean - layer.running_mean.float()).square().sum() / n)
        terms.append((std - target_std).square().sum() / n)
    mean, std = per_image_stats(images)
    terms.append(mean.square().sum() / n)
    terms.append((std - 1).square().sum() / n)
    return torch.stack(terms).sum()


def bn_mismatch(teacher: nn.Module, images: Tensor, batch_size: int = 256) -> dict[str, Any]:
    """How far the BN-input statistics of ``images`` (over the whole set) are from the running
    ones, per layer: mean |mean - running_mean| and mean |std - running_std| over channels."""
    layers = batchnorm_layers(teacher)
    names = {id(m): name for name, m in teacher.named_modules()}
    sums: dict[int, list[Any]] = {}
    recorder = _BnInputs(layers)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                recorder.inputs = []
                teacher(images[start : start + batch_size])
                for layer, x in recorder.inputs:
                    flat = x.float().transpose(0, 1).flatten(1)
                    entry = sums.setdefault(id(layer), [0.0, 0.0, 0])
                    entry[0] = entry[0] + flat.sum(1)
                    entry[1] = entry[1] + flat.square().sum(1)
                    entry[2] += flat.shape[1]
    finally:
        recorder.close()
    per_layer = {}
    for layer in layers:
        s, sq, k = sums[id(layer)]
        mean = s / k
        std = (sq / k - mean.square()).clamp(min=0).sqrt()
        running_std = layer.running_var.float().sqrt()
        per_layer[names[id(layer)]] = {
            "mean_abs_error_mean": round(float((mean - layer.running_mean).abs().mean()), 6),
            "mean_abs_error_std": round(float((std - running_std).abs().mean()), 6),
        }
    return per_layer


@torch.enable_grad()  # callers may sample under no_grad; distilling needs the image gradients
def distill_images(
    teacher: nn.Module,
    num_images: int,
    image_shape: Sequence[int],
    options: ZeroQOptions | None = None,
    *,
    progress: bool = True,
    made: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
    on_batch: Callable[[dict[str, Tensor], dict[str, Any]], None] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """``num_images`` distilled images (detached, on the teacher's device) and a report: loss
    per batch at the start and end, and the final per-BN-layer mismatch.

    ``made``: the passes an interrupted session kept (``images`` and their ``starts``) and
    their report (``batches``), the random state already as it was after them; the passes after
    them are made, at the kept passes' size. ``on_batch`` gets the same after every pass."""
    options = options or ZeroQOptions()
    require(teacher, "batchnorm", "zeroq")
    layers = batchnorm_layers(teacher)
    teacher.eval()
    device = next(teacher.parameters()).device
    batch = options.batch_size or num_images
    if options.batch_size is None and device.type == "cpu":
        batch = cpu_pass_size(teacher, layers, num_images, image_shape)
    chunks, starts, losses = [], [], []
    if made is not None:
        chunks, starts = [made[0]["images"].to(device)], [made[0]["starts"].to(device)]
        losses = list(made[1]["batches"])
        batch = losses[0]["images"]  # the size the passes had (halved after out of memory)
    done = sum(len(c) for c in chunks)
    bar = tqdm(
        total=math.ceil((num_images - done) / batch) * options.steps,
        desc="zeroq distil",
        unit="step",
        disable=not progress,
    )
    requires = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    recorder = _BnInputs(layers)
    try:
        while done < num_images:
            size = min(batch, num_images - done)
            start_images = initial_images(size, image_shape, options.init, device)
            try:
                images, first, last = _distill_batch(teacher, recorder, start_images, options, bar)
            except torch.OutOfMemoryError:
                if size == 1 or options.batch_size is not None:
                    raise
                batch = math.ceil(size / 2)  # as few passes as the memory allows
                log.warning("zeroq: out of memory at %d images a pass; trying %d", size, batch)
                recorder.inputs = []
                torch.cuda.empty_cache()
                bar.reset(total=math.ceil((num_images - done) / batch) * options.steps)
                continue
            chunks.append(images)
            starts.append(start_images)
            losses.append({"images": size, "loss_start": first, "loss_end": last})
            done += size
            if on_batch is not None and done < num_images:
                kept = {"images": torch.cat(chunks), "starts": torch.cat(starts)}
                on_batch(kept, {"batches": losses})
    finally:
        recorder.close()
        bar.close()
        for p, flag in zip(teacher.parameters(), requires, strict=True):
            p.requires_grad_(flag)
    images = torch.cat(chunks)
    report = {
        "options": asdict(options),
        "num_images": num_images,
        "batches": losses,
        "bn_mismatch": bn_mismatch(teacher, images),
        "bn_mismatch_initial": bn_mismatch(teacher, torch.cat(starts)),
    }
    return images, report


def _distill_batch(
    teacher: nn.Module,
    recorder: _BnInputs,
    start: Tensor,
    options: ZeroQOptions,
    bar: tqdm,
) -> tuple[Tensor, float, float]:
    images = start.clone(memory_format=_memory_format(start)).requires_grad_(True)
    autocast = torch.autocast(
        images.device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16"
    )
    optimizer = torch.optim.Adam([images], lr=options.lr)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, patience=options.patience, min_lr=options.min_lr
    )
    first = last = float("nan")
    for step in range(options.steps):
        optimizer.zero_grad(set_to_none=True)
        recorder.inputs = []
        with autocast:
            teacher(images)
        loss = zeroq_loss(images, recorder.inputs)
        loss.backward()
        optimizer.step()
        value = loss.item()  # the plateau schedule needs the number every step anyway
        schedule.step(value)
        first = value if step == 0 else first
        last = value
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3g}")
    recorder.inputs = []
    return images.detach().contiguous(), first, last


def _memory_format(images: Tensor) -> torch.memory_format:
    """Channels-last for image batches: about 1.2x faster convolutions on CPU, same values."""
    return torch.channels_last if images.dim() == 4 else torch.contiguous_format


class ZeroQSource(PooledSource):
    """A fixed pool of ZeroQ-distilled images (``num_images``, default 512), labelled by the
    teacher; see :class:`~zsq.synth.pool.PooledSource` for the cache and sampling."""

    needs: ClassVar[str | None] = "batchnorm"
    batched = True

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        num_images: int = 512,
        steps: int = 500,
        lr: float = 0.5,
        patience: int = 100,
        min_lr: float = 1e-4,
        init: str = "zeroq",
        batch_size: int | None = None,
        precision: str = "fp32",
        cache: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        require(teacher, "batchnorm", "zeroq")
        super().__init__(
            teacher,
            num_classes=num_classes,
            image_shape=image_shape,
            num_images=num_images,
            cache=cache,
            progress=progress,
        )
        self.options = ZeroQOptions(steps, lr, patience, min_lr, init, batch_size, precision)

    def make(self) -> tuple[Tensor, dict[str, Any]]:
        return distill_images(
            self.teacher, self.num_images, self.image_shape, self.options,
            progress=self.progress, made=self.batches_made(), on_batch=self.batch_made,
        )  # fmt: skip

    def key(self) -> dict[str, Any]:
        return {
            "source": "zeroq",
            "num_images": self.num_images,
            "image_shape": list(self.image_shape),
            **asdict(self.options),
        }
