"""Genie's distilled data (Genie-D, Jeon et al., CVPR 2023): images from a small generator and a
latent code learned together, batch by batch, until the teacher's BatchNorm layers see their
training statistics.

As the official code (SamsungLabs/Genie, ``distill.py``) does it, read as facts:

- per batch a fresh latent code z (``latent_dim`` 256, N(0, 1)) and a fresh generator: Linear
  to 128 channels at a quarter of the image size, BatchNorm, upsample x2, 3x3 conv to 64,
  BatchNorm, LeakyReLU(0.2), upsample x2, 3x3 conv to the image channels, tanh, and a BatchNorm
  without affine parameters; the generator stays in train mode;
- the loss: for every BN layer, the batch's per-channel mean and (unbiased) std of the layer's
  input against ``running_mean`` and ``sqrt(running_var + 1e-6)``, squared L2 over channels
  divided by the channel count; plus the images' per-image, per-channel mean and std against 0
  and 1, squared L2 divided by the batch size; no label loss;
- every strided convolution of the teacher sees its input "swung" during distillation only:
  reflect-padded by one pixel and cropped back at a random offset in {0, 1, 2} per axis;
- Adam on z at lr 0.1 with ``ReduceLROnPlateau`` (patience 100, min lr 1e-4) stepped on the loss
  every iteration, Adam on the generator at lr 0.01 with its lr times 0.95 every 100 iterations
  (the reference's variable names for these two rates are swapped; this is what its code does);
  4,000 iterations per batch of 128; the images kept are the last iteration's generator output.

Ours: the swing offsets come from torch's generator (the reference's numpy one), so a seeded run
is reproducible with zsq's seeding; images of any size (the second upsampling goes to the exact
size) and channel count; the generator computes in channels-last memory format (1.8x faster on
a CPU) and the statistics' std and mean are two plain passes (a cheaper backward than
``torch.std_mean``'s); in both only the order of float sums changes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.models.introspect import batchnorm_layers, require
from zsq.options import Rule, flag, number, read_options, whole_number
from zsq.synth.pool import PooledSource

log = logging.getLogger(__name__)

_EPS = 1e-6
SCHEDULE_EVERY = 100  # iterations between the generator's lr decays (and the log lines)


@dataclass(frozen=True)
class GenieOptions:
    """How images are distilled (the reference's defaults)."""

    iters: int = 4000
    batch_size: int = 128
    lr_latent: float = 0.1
    lr_generator: float = 0.01
    latent_dim: int = 256
    swing: bool = True


GENIE_OPTIONS: dict[str, Rule] = {
    "num_images": whole_number(1, 1024),
    "iters": whole_number(0, 4000),
    "batch_size": whole_number(1, 128),
    "lr_latent": number("> 0", lambda v: v > 0, 0.1),
    "lr_generator": number("> 0", lambda v: v > 0, 0.01),
    "latent_dim": whole_number(1, 256),
    "swing": flag(True),
}


class GenieGenerator(nn.Module):
    """The reference's per-batch generator, for ``channels`` x ``height`` x ``width`` images."""

    def __init__(
        self, image_shape: Sequence[int], latent_dim: int = 256, c1: int = 128, c2: int = 64
    ):
        super().__init__()
        channels, height, width = image_shape
        self.start = (math.ceil(height / 4), math.ceil(width / 4))
        self.linear = nn.Linear(latent_dim, c1 * self.start[0] * self.start[1])
        self.layers = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, stride=1, padding=1),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2),
            nn.Upsample(size=(height, width)),
            nn.Conv2d(c2, channels, 3, stride=1, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.linear(z).view(z.shape[0], -1, *self.start)
        return self.layers(out.contiguous(memory_format=torch.channels_last))


def std_mean(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``torch.std_mean(x, dims)`` (unbiased std) as two plain passes, the mean then the squared
    deviations: on a CPU its backward is cheaper than ``std_mean``'s (Genie-D takes 19 of them
    per iteration on ResNet-20); the values agree up to the order of float sums."""
    mean = x.mean(dim=dims, keepdim=True)
    count = x.numel() // mean.numel()
    var = (x - mean).square().sum(dim=dims) / (count - 1)
    return var.sqrt(), mean.squeeze(dims)


def _l2(target: Tensor, value: Tensor) -> Tensor:
    """The reference's ``||target - value||^2 / len(value)``."""
    return (target - value).norm() ** 2 / value.size(0)


def swing(x: Tensor, dx: int, dy: int) -> Tensor:
    """``x`` reflect-padded by one pixel and cropped back at offset (``dx``, ``dy``) in
    {0, 1, 2}: (1, 1) is ``x`` itself, the others shift it by a pixel."""
    padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


class _Swing:
    """Forward pre-hooks on the teacher's strided convolutions: reflect-pad the input by one pixel
    and crop it back at a random offset (distillation only; removed afterwards)."""

    def __init__(self, teacher: nn.Module) -> None:
        convs = [m for m in teacher.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
        self.handles = [conv.register_forward_pre_hook(self._swing) for conv in convs]

    @staticmethod
    def _swing(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        dx, dy = (int(v) for v in torch.randint(0, 3, (2,)))
        return (swing(inputs[0], dx, dy), *inputs[1:])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _BnInputs:
    """The input of each BN layer in the last forward."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.inputs: dict[int, Tensor] = {}
        self.handles = [
            layer.register_forward_hook(self._hook(index)) for index, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.inputs[index] = inputs[0]

        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.enable_grad()  # callers may sample under no_grad; distilling needs the gradients
def distill_genie(
    teacher: nn.Module,
    num_images: int,
    image_shape: Sequence[int],
    options: GenieOptions | None = None,
    *,
    progress: bool = True,
    made: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
    on_batch: Callable[[dict[str, Tensor], dict[str, Any]], None] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """``num_images`` Genie-D images (detached, on the teacher's device) and a report: the loss
    of every batch at its first and last iteration, and the seconds taken.

    ``made``: the images (``{"images": ...}``) and report of the first batches, kept by an
    interrupted session (the random state already as it was after them); the batches after them
    are made. ``on_batch`` gets the same after every batch."""
    options = options or GenieOptions()
    require(teacher, "batchnorm", "genie")
    layers = batchnorm_layers(teacher)
    device = next(teacher.parameters()).device
    targets = [
        (layer.running_mean.detach().float(), torch.sqrt(layer.running_var.float() + _EPS))
        for layer in layers
    ]
    teacher.eval()
    frozen = [p for p in teacher.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    recorder, swing = _BnInputs(layers), _Swing(teacher) if options.swing else None
    chunks, report = _made_so_far(made, num_images, options.batch_size, device)
    started = time.perf_counter() - report["seconds"]
    sizes = [
        min(options.batch_size, num_images - s) for s in range(0, num_images, options.batch_size)
    ]
    bar = tqdm(total=len(sizes) * options.iters, desc="genie images", disable=not progress)
    bar.update(len(report["loss_last"]) * options.iters)
    try:
        for size in sizes[len(report["loss_last"]) :]:
            images, losses = _distill_batch(
                teacher, recorder, targets, size, image_shape, options, device, bar
            )
            chunks.append(images)
            report["loss_first"].append(round(losses[0], 6) if losses else float("nan"))
            report["loss_last"].append(round(losses[-1], 6) if losses else float("nan"))
            report["seconds"] = round(time.perf_counter() - started, 2)
            if on_batch is not None and len(report["loss_last"]) < len(sizes):
                on_batch({"images": torch.cat(chunks).detach()}, report)
    finally:
        bar.close()
        recorder.remove()
        if swing is not None:
            swing.remove()
        for p in frozen:
            p.requires_grad_(True)
    report.update(images=num_images, iters=options.iters)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return torch.cat(chunks).detach(), report


def _made_so_far(
    made: tuple[dict[str, Tensor], dict[str, Any]] | None,
    num_images: int,
    batch_size: int,
    device: Any,
) -> tuple[list[Tensor], dict[str, Any]]:
    """The kept batches as a list of images and the report to continue (empty at the start)."""
    if made is None:
        return [], {"loss_first": [], "loss_last": [], "seconds": 0.0}
    images, report = made[0]["images"], made[1]
    batches = len(report.get("loss_last", []))
    if len(images) != min(batches * batch_size, num_images) or len(images) >= num_images:
        raise ZsqError(
            f"the genie images kept so far ({len(images)} images in {batches} batches) do not "
            f"fit {num_images} images in batches of {batch_size}; delete them to start again"
        )
    report = {k: report[k] for k in ("loss_first", "loss_last", "seconds")}
    return [images.to(device)], report


def _distill_batch(
    teacher: nn.Module,
    recorder: _BnInputs,
    targets: list[tuple[Tensor, Tensor]],
    size: int,
    image_shape: Sequence[int],
    options: GenieOptions,
    device: torch.device,
    bar: Any,
) -> tuple[Tensor, list[float]]:
    """One batch: a fresh latent code and generator, optimised together."""
    z = torch.randn(size, options.latent_dim, device=device).requires_grad_()
    generator = GenieGenerator(image_shape, options.latent_dim).to(device).train()
    generator.to(memory_format=torch.channels_last)  # 1.8x faster on a CPU, the same values
    opt_z = torch.optim.Adam([z], lr=options.lr_latent)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, min_lr=1e-4, patience=100)
    opt_g = torch.optim.Adam(generator.parameters(), lr=options.lr_generator)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.95)
    channels = image_shape[0]
    prior_mean = torch.zeros(1, channels, device=device)
    prior_std = torch.ones(1, channels, device=device)
    images = generator(z).detach() if options.iters == 0 else None
    losses: list[float] = []
    for it in range(options.iters):
        opt_z.zero_grad()
        opt_g.zero_grad()
        images = generator(z)
        teacher(images)
        std, mean = std_mean(images, [2, 3])
        mean_loss, std_loss = _l2(prior_mean, mean), _l2(prior_std, std)
        for index, (running_mean, running_std) in enumerate(targets):
            x = recorder.inputs[index].float()
            std, mean = std_mean(x, [0, 2, 3] if x.dim() == 4 else [0])
            mean_loss = mean_loss + _l2(running_mean, mean)
            std_loss = std_loss + _l2(running_std, std)
        loss = mean_loss + std_loss
        loss.backward()
        opt_z.step()
        opt_g.step()
        value = float(loss.detach())
        plateau.step(value)
        if (it + 1) % SCHEDULE_EVERY == 0:
            decay.step()
            log.debug("genie batch: %d/%d, loss %.4f", it + 1, options.iters, value)
        losses.append(value)
        bar.update(1)
    return images.detach(), losses


class GenieSource(PooledSource):
    """A fixed pool of Genie-D images (``num_images``, default 1,024), labelled by the teacher;
    see :class:`~zsq.synth.pool.PooledSource` for the cache and sampling."""

    needs: ClassVar[str | None] = "batchnorm"
    batched = True
    OPTIONS: ClassVar[dict[str, Rule]] = GENIE_OPTIONS

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        num_images: int = 1024,
        iters: int = 4000,
        batch_size: int = 128,
        lr_latent: float = 0.1,
        lr_generator: float = 0.01,
        latent_dim: int = 256,
        swing: bool = True,
        cache: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        require(teacher, "batchnorm", "genie")
        checked = read_options("genie source", GENIE_OPTIONS, locals())
        super().__init__(
            teacher,
            num_classes=num_classes,
            image_shape=image_shape,
            num_images=checked["num_images"],
            cache=cache,
            progress=progress,
        )
        fields = ("iters", "batch_size", "lr_latent", "lr_generator", "latent_dim", "swing")
        self.options = GenieOptions(**{name: checked[name] for name in fields})

    def make(self) -> tuple[Tensor, dict[str, Any]]:
        return distill_genie(
            self.teacher, self.num_images, self.image_shape, self.options,
            progress=self.progress, made=self.batches_made(), on_batch=self.batch_made,
        )  # fmt: skip

    def key(self) -> dict[str, Any]:
        return {
            "source": "genie",
            "num_images": self.num_images,
            "image_shape": list(self.image_shape),
            **asdict(self.options),
        }
