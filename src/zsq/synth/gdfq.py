"""GDFQ: a class-conditional generator trained against the frozen teacher.

The generator learns to produce images the teacher classifies as the drawn label (CE) and whose
per-layer statistics match the teacher's BatchNorm running statistics (BNS). The student is then
distilled on those images. Qimera and ARC reuse ``GdfqSource`` and override its small pieces
(``draw_targets``, ``draw_latent``, ``generate``, ``generator_loss``) or pass another generator.

A generator here is any module called as ``generator(z, cond)`` where ``cond`` is either hard
labels (B,) or class weights (B, num_classes) whose rows sum to 1 (mixtures for Qimera).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq import distributed
from zsq.errors import ZsqError
from zsq.options import (
    Rule,
    number,
    number_pair,
    one_of,
    python_object,
    read_options,
    whole_number,
)
from zsq.synth.base import (
    SampleSource,
    SynthBatch,
    check_batch_size,
    check_image_shape,
    check_num_classes,
    freeze_teacher,
    one_hot,
)
from zsq.synth.bns import BatchNormStatsLoss

log = logging.getLogger(__name__)

Variant = Literal["auto", "cifar", "imagenet"]
_VARIANTS = ("auto", "cifar", "imagenet")
IMAGENET_MIN_SIZE = 128  # "auto" picks the ImageNet variant from this image side on


def class_lookup(table: nn.Embedding, cond: Tensor) -> Tensor:
    """Rows of ``table`` for hard labels (B,), or their mixture for class weights (B, classes)."""
    if cond.dim() == 1:
        return table(cond)
    return cond.to(table.weight.dtype) @ table.weight


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine, then a per-class scale and shift (mixed for soft conditions)."""

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.weight = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.weight.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gamma = class_lookup(self.weight, cond)[:, :, None, None]
        beta = class_lookup(self.bias, cond)[:, :, None, None]
        return self.bn(x) * gamma + beta


class GdfqGenerator(nn.Module):
    """GDFQ generator: Linear, BN, 2 x (2x up, conv3x3, BN, LeakyReLU), conv3x3, Tanh, BN.

    ``conditioning="embedding"`` is the CIFAR variant: a class embedding multiplies z before the
    Linear layer. ``conditioning="batchnorm"`` is the ImageNet variant: z goes straight into the
    Linear layer and the hidden BatchNorms are class-conditional.

    The feature map starts at (H/4, W/4) and is upsampled twice to the teacher's input size. The
    final BN (no affine) puts every channel at zero mean / unit variance, i.e. in the teacher's
    normalised input space.

    ``bn_eps`` is the eps of the two BNs after the hidden convs. The reference code passes 0.8
    there (positionally; most likely meant as a Keras-style momentum) and its results were
    obtained with it, so 0.8 is the default. The BN after the Linear layer and the output BN keep
    PyTorch's 1e-5, as in the reference.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        latent_dim: int = 100,
        conditioning: Literal["embedding", "batchnorm"] = "embedding",
        width: int = 128,
        bn_eps: float = 0.8,
    ) -> None:
        super().__init__()
        channels, height, width_px = check_image_shape(image_shape)
        if height % 4 or width_px % 4:
            raise ZsqError(
                f"GDFQ generators upsample 4x from (H/4, W/4), so the image side must be a "
                f"multiple of 4; got {height}x{width_px}; resize the teacher's input"
            )
        if conditioning not in ("embedding", "batchnorm"):
            raise ZsqError(f"conditioning must be 'embedding' or 'batchnorm', got {conditioning!r}")
        self.num_classes = check_num_classes(num_classes)
        self.latent_dim = latent_dim
        self.image_shape = (channels, height, width_px)
        self.conditioning = conditioning
        self.width = width
        self.init_hw = (height // 4, width_px // 4)
        hidden = width // 2

        self.embedding = (
            nn.Embedding(num_classes, latent_dim) if conditioning == "embedding" else None
        )
        self.fc = nn.Linear(latent_dim, width * self.init_hw[0] * self.init_hw[1])
        self.bn0 = self._norm(width, 1e-5)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = self._norm(width, bn_eps)
        self.conv2 = nn.Conv2d(width, hidden, 3, padding=1)
        self.bn2 = self._norm(hidden, bn_eps)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def _norm(self, features: int, eps: float) -> nn.Module:
        if self.conditioning == "batchnorm":
            return ConditionalBatchNorm2d(features, self.num_classes, eps=eps)
        return nn.BatchNorm2d(features, eps=eps)

    def encode(self, z: Tensor, cond: Tensor) -> Tensor:
        """The code fed to the Linear layer: embedding(cond) * z, or z alone (ImageNet variant)."""
        if self.embedding is None:
            return z
        return class_lookup(self.embedding, cond) * z

    def decode(self, code: Tensor, cond: Tensor | None = None) -> Tensor:
        """Image from a code; ``cond`` is needed only by the class-conditional BNs."""
        x = self.fc(code).view(code.shape[0], self.width, *self.init_hw)
        x = self._apply_norm(self.bn0, x, cond)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.leaky_relu(self._apply_norm(self.bn1, self.conv1(x), cond), 0.2)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.leaky_relu(self._apply_norm(self.bn2, self.conv2(x), cond), 0.2)
        return self.bn_out(torch.tanh(self.conv_out(x)))

    @staticmethod
    def _apply_norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        if isinstance(norm, ConditionalBatchNorm2d):
            if cond is None:
                raise ValueError("the class-conditional generator needs cond to decode")
            return norm(x, cond)
        return norm(x)

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        return self.decode(self.encode(z, cond), cond)


def resolve_variant(image_shape: Sequence[int], variant: str = "auto") -> str:
    """'cifar' or 'imagenet'; 'auto' picks ImageNet from an image side of 128 on."""
    if variant not in _VARIANTS:
        raise ZsqError(f"unknown GDFQ generator variant {variant!r}; use one of {_VARIANTS}")
    if variant != "auto":
        return variant
    _, height, width = check_image_shape(image_shape)
    return "imagenet" if max(height, width) >= IMAGENET_MIN_SIZE else "cifar"


def build_gdfq_generator(
    num_classes: int,
    image_shape: Sequence[int],
    *,
    variant: Variant = "auto",
    latent_dim: int = 100,
    bn_eps: float = 0.8,
) -> GdfqGenerator:
    """The GDFQ generator sized for the teacher's input (see ``GdfqGenerator``)."""
    chosen = resolve_variant(image_shape, variant)
    conditioning = "batchnorm" if chosen == "imagenet" else "embedding"
    return GdfqGenerator(
        num_classes, image_shape, latent_dim=latent_dim, conditioning=conditioning, bn_eps=bn_eps
    )


# The generator options GDFQ, Qimera and ARC share, as GDFQ checks them.
GENERATOR_OPTIONS: dict[str, Rule] = {
    "latent_dim": whole_number(1, example=100),
    "bns_weight": number(">= 0", lambda v: v >= 0, example=0.1),
    "lr": number("> 0", lambda v: v > 0, example=1e-3),
    "betas": number_pair("in [0, 1) (Adam's)", lambda v: 0 <= v < 1, example="0.5,0.999"),
    "generator": python_object(nn.Module, "a torch.nn.Module called as generator(z, cond)"),
    "variant": one_of(_VARIANTS, example="auto"),
    "bn_eps": number("> 0", lambda v: v > 0, example=0.8),
}


class GdfqSource(SampleSource):
    """GDFQ's generator as a sample source: ``step`` trains it once, ``sample`` only draws.

    Loss per step: ``generator_loss(teacher(G(z, y)), targets) + bns_weight * BNS`` with
    y uniform over classes, Adam(lr, betas). The returned batch holds the images drawn *before*
    the update, so the student trains on the same batch the generator just learned from, as in
    the reference.

    The teacher is frozen in place (eval mode, ``requires_grad=False`` on its parameters): build
    the student (a deep copy) before the source, or re-enable its gradients.
    Like the reference, the generator normally stays in train mode (its BNs use batch statistics);
    ``.eval()`` on the source makes ``sample`` use the generator's running statistics.
    """

    trainable = True
    needs: ClassVar[str | None] = "batchnorm"
    OPTIONS: ClassVar[dict[str, Rule]] = GENERATOR_OPTIONS

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        latent_dim: int = 100,
        bns_weight: float = 0.1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        generator: nn.Module | None = None,
        variant: Variant = "auto",
        bn_eps: float = 0.8,
    ) -> None:
        options = read_options("gdfq source", GENERATOR_OPTIONS, locals())
        super().__init__(teacher, num_classes=num_classes, image_shape=image_shape)
        # First, so a teacher without BN fails fast, untouched and before any large allocation.
        self.bns = BatchNormStatsLoss(teacher)
        freeze_teacher(teacher)
        if generator is None:
            generator = build_gdfq_generator(
                self.num_classes,
                self.image_shape,
                variant=variant,
                latent_dim=latent_dim,
                bn_eps=options["bn_eps"],
            )
        self.latent_dim: int = getattr(generator, "latent_dim", latent_dim)
        self.bns_weight = options["bns_weight"]
        self.generator = generator.to(self.device)
        self.optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=options["lr"], betas=options["betas"]
        )
        log.info(
            "%s: %s, %.2fM generator params, %d teacher BN layers",
            type(self).__name__,
            type(generator).__name__,
            sum(p.numel() for p in self.generator.parameters()) / 1e6,
            len(self.bns.layers),
        )

    # --- overridable pieces -------------------------------------------------------------------

    def draw_targets(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(generator condition, target probabilities, hard labels): uniform random classes."""
        labels = torch.randint(0, self.num_classes, (batch_size,), device=self.device)
        return labels, one_hot(labels, self.num_classes), labels

    def draw_latent(self, batch_size: int) -> Tensor:
        return torch.randn(batch_size, self.latent_dim, device=self.device)

    def generate(self, z: Tensor, cond: Tensor) -> Tensor:
        return self.generator(z, cond)

    def generator_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy of the teacher's logits against the target probabilities."""
        return F.cross_entropy(logits.float(), targets)

    # --- SampleSource -------------------------------------------------------------------------

    def _draw(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Images (with graph when grad is on), targets, labels; one RNG order for both paths."""
        check_batch_size(batch_size)
        z = self.draw_latent(batch_size)
        cond, targets, labels = self.draw_targets(batch_size)
        return self.generate(z, cond), targets, labels

    @torch.no_grad()
    def sample(self, batch_size: int) -> SynthBatch:
        images, targets, labels = self._draw(batch_size)
        return SynthBatch(images, targets, labels)

    def step(self, batch_size: int) -> tuple[SynthBatch, dict[str, Tensor]]:
        self._ensure_teacher_eval()
        with self.forward_precision():
            images, targets, labels = self._draw(batch_size)
            with self.bns:
                logits = self.teacher(images)
        self._check_logits(logits)
        ce = self.generator_loss(logits, targets)
        bns = self.bns.loss()
        loss = ce + self.bns_weight * bns
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(distributed.optimized_params(self.optimizer))
        self.optimizer.step()
        self.bns.records = []  # drop the graph-holding stats until the next step
        terms = {"gen_ce": ce.detach(), "gen_bns": bns.detach(), "gen_loss": loss.detach()}
        return SynthBatch(images.detach().float(), targets, labels), terms

    def close(self) -> None:
        self.bns.remove()
