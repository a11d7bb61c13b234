"""Qimera: GDFQ plus *superposed* batches that sit near the teacher's decision boundaries.

As the official AIT repository's Qimera (``Qimera_AIT/main.py``, ``trainer.py``) does it:

* With probability ``mix_prob`` a whole batch is superposed (one host-side draw per batch). Each
  sample draws ``num_mix`` (K) classes uniformly *with replacement*, K noise vectors and weights
  ``lambda = softmax(randn(K))``. Its soft target accumulates lambda on the drawn classes
  (scatter-add: a class drawn twice gets the sum of its two lambdas). Other batches are plain
  GDFQ batches: one uniformly drawn class and one noise vector per sample, one-hot targets.
* Generator input (``QimeraGenerator.encode``): ``e_y + noise_scale * z`` (class embedding plus
  noise) standardised by a non-affine BatchNorm1d applied to the *transposed* code. So a plain
  (B, latent) code is standardised per sample over its latent dimensions, and a superposed
  (B, K, latent) code per slot k over the batch and latent dimensions. A superposed sample's
  input is the lambda-weighted sum of its K standardised slot codes.
* On generators with class-conditional BN (the ImageNet variant) the BN scales and shifts of a
  superposed sample are the MEAN over K of ``lambda_k * gamma_{y_k}`` (so they shrink as 1/K), as
  the official conditional BN does.
* Generator loss: GDFQ's (soft-label CE + ``bns_weight`` * BNS); ``GdfqSource.step`` is reused.

Settings of the AIT repository's runs, and the defaults derived from ``num_classes``:

============  ==========  ========  =======  ===================  ===============
setting       num_mix K   mix_prob  latent   class embedding      derived default
============  ==========  ========  =======  ===================  ===============
CIFAR-10      2           0.4       64       teacher classifier   same
CIFAR-100     25          0.4       64       teacher classifier   same
ResNet-18     250         0.4       512      random               same
ResNet-50     100         0.4       2048     teacher classifier   K=250, random
MobileNetV2   250         0.4       1280     random               same
============  ==========  ========  =======  ===================  ===============

ResNet-50 therefore needs ``num_mix=100, init_from_teacher=True``; the original Qimera
repository's ResNet-50 run uses ``num_mix=500, mix_prob=0.7`` (and K=10 on CIFAR-100). The
default K is a quarter of the classes, at least 2 and at most 250 (2 / 25 / 250 for 10 / 100 /
1000 classes); the embeddings start from the teacher's classifier rows for up to 100 classes and
are random (N(0, 1)) above. The latent size is the classifier's input size (so the rows fit), 64
when the teacher has no ``nn.Linear`` classifier. The official ImageNet generators thus have a
Linear layer of latent x 128 x 56 x 56 weights (205M for ResNet-18, 822M for ResNet-50).

Options the official runs leave off: ``disentangle`` adds the paper's disentanglement mapping, a
Linear(latent, min(latent, 100)) on every slot code before the weighted sum (the official
``--no_DM`` switch, whose default disables it); ``distinct_classes`` draws the K classes of a
sample without replacement (zsq's earlier behaviour: every superposed sample then really mixes K
classes); ``noise_scale`` scales z (1.0 officially; its ImageNet generator has no such factor).

A generator passed in (``generator=``) that is not a ``QimeraGenerator`` is called as
``generator(z, cond)`` with one (B, latent) noise draw and ``cond`` = the hard labels or the soft
targets, i.e. superposed through its own class lookup (e.g. ARC's conditional BNs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.options import (
    Rule,
    flag,
    number,
    optional,
    read_options,
    whole_number,
)
from zsq.synth.base import (
    check_batch_size,
    check_num_classes,
)
from zsq.synth.gdfq import GENERATOR_OPTIONS, GdfqSource, Variant, build_gdfq_generator

log = logging.getLogger(__name__)

FALLBACK_LATENT_DIM = 64  # the official CIFAR config; used when the teacher has no classifier
TEACHER_INIT_MAX_CLASSES = 100  # AIT runs: classifier-initialised embeddings on CIFAR
MAX_DEFAULT_NUM_MIX = 250
MAPPING_MAX_DIM = 100  # the official disentanglement mapping's output size (64 on ResNet-20)
INPUT_NORM_EPS = 1e-5  # BatchNorm1d's default, as in the official input normaliser

LATENT_DIM = whole_number(1, example=FALLBACK_LATENT_DIM)
NOISE_SCALE = number(">= 0", lambda v: v >= 0, example=1.0)
QIMERA_OPTIONS: dict[str, Rule] = {
    **GENERATOR_OPTIONS,
    "mix_prob": number("in [0, 1]", lambda v: 0 <= v <= 1, example=0.4),
    "num_mix": optional(whole_number(1, example=2), "a quarter of the classes (2 to 250)"),
    "init_from_teacher": optional(flag(True), "the teacher's classifier up to 100 classes"),
    "disentangle": flag(False),
    "noise_scale": NOISE_SCALE,
    "distinct_classes": flag(False),
    "latent_dim": optional(LATENT_DIM, "the teacher classifier's input size"),
}


def default_num_mix(num_classes: int) -> int:
    """A quarter of the classes in [2, 250]: the AIT runs' 2 / 25 / 250 for 10 / 100 / 1000."""
    return min(MAX_DEFAULT_NUM_MIX, max(2, num_classes // 4))


def mixture_weights(classes: Tensor, lambdas: Tensor, num_classes: int) -> Tensor:
    """(B, num_classes) rows accumulating ``lambdas`` at ``classes`` (repeats add up)."""
    out = torch.zeros(classes.shape[0], num_classes, dtype=lambdas.dtype, device=lambdas.device)
    return out.scatter_add_(1, classes, lambdas)


def standardise(x: Tensor, dims: int | tuple[int, ...], eps: float = INPUT_NORM_EPS) -> Tensor:
    """Zero mean, unit (biased) variance over ``dims``: a non-affine, batch-statistics BN."""
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


class QimeraGenerator(nn.Module):
    """Qimera's input stage (class embedding + noise, standardised) on a GDFQ generator body.

    Called as ``generator(z, labels)`` with labels (B,) and z (B, latent), or as
    ``generator(z, classes, lambdas)`` with classes and lambdas (B, K) and z (B, K, latent) for
    superposed samples. The body is GDFQ's generator (``variant`` picks plain or
    class-conditional BNs) with its own embedding-times-noise conditioning removed.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        latent_dim: int = FALLBACK_LATENT_DIM,
        variant: Variant = "auto",
        noise_scale: float = 1.0,
        disentangle: bool = False,
        bn_eps: float = 0.8,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        checked = read_options(
            "QimeraGenerator",
            {"latent_dim": LATENT_DIM, "noise_scale": NOISE_SCALE, "disentangle": flag(False)},
            {"latent_dim": latent_dim, "noise_scale": noise_scale, "disentangle": disentangle},
        )
        self.latent_dim: int = checked["latent_dim"]
        self.noise_scale: float = checked["noise_scale"]
        self.embedding = nn.Embedding(num_classes, latent_dim)
        self.mapping = (
            nn.Linear(latent_dim, min(latent_dim, MAPPING_MAX_DIM)) if disentangle else None
        )
        code_dim = self.mapping.out_features if self.mapping is not None else latent_dim
        self.body = build_gdfq_generator(
            num_classes, image_shape, variant=variant, latent_dim=code_dim, bn_eps=bn_eps
        )
        self.body.embedding = None  # the input stage above conditions the code instead

    @property
    def class_conditional_bn(self) -> bool:
        return self.body.conditioning == "batchnorm"

    def encode(self, z: Tensor, labels: Tensor, lambdas: Tensor | None = None) -> Tensor:
        """The code fed to the body's Linear layer (see the module doc)."""
        codes = self.embedding(labels) + self.noise_scale * z
        codes = standardise(codes, dims=1 if lambdas is None else (0, 2))
        if self.mapping is not None:
            codes = self.mapping(codes)
        if lambdas is None:
            return codes
        return (lambdas.to(codes.dtype).unsqueeze(2) * codes).sum(dim=1)

    def bn_condition(self, labels: Tensor, lambdas: Tensor | None = None) -> Tensor | None:
        """What the class-conditional BNs look up: labels, or weights giving the mean over K."""
        if not self.class_conditional_bn:
            return None
        if lambdas is None:
            return labels
        return mixture_weights(labels, lambdas, self.num_classes) / labels.shape[1]

    def forward(self, z: Tensor, labels: Tensor, lambdas: Tensor | None = None) -> Tensor:
        code = self.encode(z, labels, lambdas)
        return self.body.decode(code, self.bn_condition(labels, lambdas))


class QimeraSource(GdfqSource):
    """GDFQ source whose batches are superposed with probability ``mix_prob`` (see module doc).

    Whether a batch is superposed is drawn on the host from torch's CPU generator, not on the
    source's device: the answer decides on the host which kind of batch to build, so a device
    draw would cost a host sync per batch. The CPU generator is part of the state the trainer
    checkpoints (``zsq.runtime.rng_state``), so resumes stay exact. Superposed batches have
    ``labels=None``. ``init_from_teacher=None`` means: from the teacher's classifier for up to
    100 classes when its input size is the latent size, random otherwise.
    """

    OPTIONS: ClassVar[dict[str, Rule]] = QIMERA_OPTIONS

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        mix_prob: float = 0.4,
        num_mix: int | None = None,
        init_from_teacher: bool | None = None,
        disentangle: bool = False,
        noise_scale: float = 1.0,
        distinct_classes: bool = False,
        latent_dim: int | None = None,
        bns_weight: float = 0.1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        generator: nn.Module | None = None,
        variant: Variant = "auto",
        bn_eps: float = 0.8,
    ) -> None:
        check_num_classes(num_classes)
        options = read_options("qimera source", QIMERA_OPTIONS, locals())
        checked_num_mix = _check_num_mix(num_mix, num_classes, distinct_classes)
        if generator is None:
            generator, init_weight = _build_generator(
                teacher,
                num_classes=num_classes,
                image_shape=image_shape,
                latent_dim=latent_dim,
                init_from_teacher=init_from_teacher,
                variant=variant,
                noise_scale=noise_scale,
                disentangle=disentangle,
                bn_eps=bn_eps,
            )
        else:
            _check_custom_generator_options(init_from_teacher, disentangle, noise_scale)
            init_weight = None
        super().__init__(
            teacher,
            num_classes=num_classes,
            image_shape=image_shape,
            latent_dim=FALLBACK_LATENT_DIM if latent_dim is None else latent_dim,
            bns_weight=bns_weight,
            lr=lr,
            betas=options["betas"],
            generator=generator,
        )
        self.mix_prob = options["mix_prob"]
        self.num_mix = checked_num_mix
        self.distinct_classes = distinct_classes
        self.embedding_from_teacher = init_weight is not None

    # --- drawing ------------------------------------------------------------------------------

    def _draw(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """A plain GDFQ batch, or a superposed one (RNG order: z, classes, lambdas)."""
        check_batch_size(batch_size)
        if not self.draw_superposed():
            return super()._draw(batch_size)
        qimera = isinstance(self.generator, QimeraGenerator)
        z_shape = (batch_size, self.num_mix) if qimera else (batch_size,)
        z = torch.randn(*z_shape, self.latent_dim, device=self.device)
        classes, lambdas = self.draw_mixture(batch_size)
        targets = mixture_weights(classes, lambdas, self.num_classes)
        images = self.generator(z, classes, lambdas) if qimera else self.generator(z, targets)
        return images, targets, None

    def draw_superposed(self) -> bool:
        """One CPU-generator draw: True with probability ``mix_prob`` (no device sync)."""
        return bool(torch.rand((), device="cpu") < self.mix_prob)

    def draw_mixture(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """K uniform classes per sample (B, K) and weights softmax(randn(K)) (B, K)."""
        shape = (batch_size, self.num_mix)
        if self.distinct_classes:
            scores = torch.rand(batch_size, self.num_classes, device=self.device)
            classes = scores.topk(self.num_mix, dim=1).indices
        else:
            classes = torch.randint(0, self.num_classes, shape, device=self.device)
        lambdas = torch.softmax(torch.randn(shape, device=self.device), dim=1)
        return classes, lambdas

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mix_prob={self.mix_prob}, num_mix={self.num_mix}, "
            f"distinct_classes={self.distinct_classes}, "
            f"embedding_from_teacher={self.embedding_from_teacher}"
        )


def find_classifier(teacher: nn.Module, num_classes: int) -> nn.Linear | None:
    """The teacher's last ``nn.Linear`` with ``out_features == num_classes``, if any."""
    found = None
    for module in teacher.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = module
    return found


def init_embedding_from(table: nn.Embedding, weight: Tensor) -> None:
    """Copy the classifier's weight rows (one per class) into the class embedding."""
    with torch.no_grad():
        table.weight.copy_(weight.detach().to(table.weight))


def _build_generator(
    teacher: nn.Module,
    *,
    num_classes: int,
    image_shape: Sequence[int],
    latent_dim: int | None,
    init_from_teacher: bool | None,
    variant: Variant,
    noise_scale: float,
    disentangle: bool,
    bn_eps: float,
) -> tuple[QimeraGenerator, Tensor | None]:
    """The official generator, its embedding initialised as ``init_from_teacher`` says."""
    classifier = find_classifier(teacher, num_classes)
    if latent_dim is None:
        latent_dim = classifier.in_features if classifier is not None else FALLBACK_LATENT_DIM
    init_weight = _teacher_init_weight(classifier, num_classes, latent_dim, init_from_teacher)
    generator = QimeraGenerator(
        num_classes,
        image_shape,
        latent_dim=latent_dim,
        variant=variant,
        noise_scale=noise_scale,
        disentangle=disentangle,
        bn_eps=bn_eps,
    )
    if init_weight is not None:
        init_embedding_from(generator.embedding, init_weight)
    return generator, init_weight


def _teacher_init_weight(
    classifier: nn.Linear | None,
    num_classes: int,
    latent_dim: int,
    init_from_teacher: bool | None,
) -> Tensor | None:
    """The classifier weight to start the embedding from, or None for a random start.

    An explicit ``latent_dim`` that disagrees with the classifier is an error when asked for
    explicitly rather than a silent projection: a projection would blur the class geometry the
    initialisation is meant to carry. The default just falls back to random embeddings.
    """
    fits = classifier is not None and classifier.in_features == latent_dim
    if init_from_teacher is None:
        use = fits and num_classes <= TEACHER_INIT_MAX_CLASSES
        log.info("Qimera: %s class embeddings", "teacher-classifier" if use else "random")
        return classifier.weight if use else None
    if not init_from_teacher:
        return None
    if classifier is None:
        raise ZsqError(
            f"init_from_teacher: the teacher has no nn.Linear with out_features={num_classes}; "
            "check num_classes or pass init_from_teacher=False"
        )
    if not fits:
        raise ZsqError(
            f"init_from_teacher: latent_dim={latent_dim} but the teacher classifier takes "
            f"{classifier.in_features} features; pass latent_dim={classifier.in_features} "
            "or leave it unset"
        )
    return classifier.weight


def _check_custom_generator_options(
    init_from_teacher: bool | None, disentangle: bool, noise_scale: float
) -> None:
    if init_from_teacher or disentangle or noise_scale != 1.0:
        raise ZsqError(
            "init_from_teacher, disentangle and noise_scale configure the built-in Qimera "
            "generator; leave them unset when passing generator="
        )


def _check_num_mix(num_mix: int | None, num_classes: int, distinct_classes: bool) -> int:
    """The K to draw (``num_mix`` is None or a whole number >= 1 already): distinct classes
    cannot outnumber the classes."""
    if num_mix is None:
        default = default_num_mix(num_classes)
        return min(default, num_classes) if distinct_classes else default
    if distinct_classes and num_mix > num_classes:
        raise ZsqError(
            f"qimera source option num_mix={num_mix} exceeds the {num_classes} classes that "
            "distinct_classes=true draws without replacement; lower num_mix or drop "
            "distinct_classes"
        )
    return num_mix
