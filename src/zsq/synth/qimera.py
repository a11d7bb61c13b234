"""Qimera: GDFQ plus *superposed* batches that sit near the teacher's decision boundaries.

With probability ``mix_prob`` a whole batch is superposed: every sample draws ``num_mix`` (K)
distinct classes, K noise vectors and weights ``lambda = softmax(randn(K))``; the generator gets
the lambda-weighted superposition of the K classes' conditioning, and the soft target puts lambda
on those classes (so the student also learns from boundary-supporting samples). Other batches are
plain GDFQ batches. The generator loss is GDFQ's (soft-label CE + ``bns_weight`` * BNS, since
``F.cross_entropy`` takes target probabilities), and ``GdfqSource.step`` is reused as is.

How the superposition is done (one generator forward per batch):

* Embedding-conditioned generators (GDFQ's CIFAR variant, ``code = e_y * z``): the code fed to
  the Linear layer is ``sum_k lambda_k * (e_k / ||e_k||) * z_k``, i.e. GDFQ's element-wise
  embedding-times-noise per class slot, with each class embedding L2-normalised, then weighted
  and summed. Plain batches keep GDFQ's unnormalised ``e_y * z``; the scale difference between
  the two kinds of batch is absorbed by the generator's BatchNorm after the Linear layer (batches
  are never mixed, and the generator trains with batch statistics).
* Generators conditioned only through class-conditional BN (GDFQ's ImageNet variant, ARC): the
  BN scales/shifts are mixed with the lambda weights (``class_lookup``). The noise there does not
  depend on the class, so a renormalised mixture of K noise vectors would just be another
  N(0, I) draw: the first slot's noise is used.

Superposed-batch conditions are (B, num_classes) weight rows equal to the targets; plain batches
condition on hard labels (B,). ``generate`` tells them apart by rank (shape metadata, no sync) and
pairs noise slot k with the k-th largest lambda (``topk``), which is as random as any pairing.

Options: ``init_from_teacher`` copies the teacher classifier's weight rows into the class
embedding (the latent size then defaults to the classifier's input size); ``disentangle`` adds the
paper's disentanglement mapping, a learned Linear(latent, latent) on the code of every batch,
plain ones included (identity at init, no activation).
Being linear and with lambdas summing to 1, applying it after the superposition equals applying
it to each class slot before. The official runs do not use it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.synth.base import check_num_classes
from zsq.synth.gdfq import GdfqSource, Variant, resolve_variant

log = logging.getLogger(__name__)

DEFAULT_LATENT_DIM = 100


class QimeraSource(GdfqSource):
    """GDFQ source whose batches are superposed with probability ``mix_prob`` (see module doc).

    Whether a batch is superposed is drawn on the host from torch's CPU generator, not on the
    source's device: the answer decides on the host whether the batch has hard labels, so a
    device draw would cost a host sync per batch. The CPU generator is part of the state the
    trainer checkpoints (``zsq.runtime.rng_state``), so resumes stay exact. Superposed batches
    have ``labels=None``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        mix_prob: float = 0.4,
        num_mix: int | None = None,
        init_from_teacher: bool = False,
        disentangle: bool = False,
        latent_dim: int | None = None,
        bns_weight: float = 0.1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        generator: nn.Module | None = None,
        variant: Variant = "auto",
        bn_eps: float = 0.8,
    ) -> None:
        check_num_classes(num_classes)
        if not 0.0 <= mix_prob <= 1.0:
            raise ZsqError(f"mix_prob must be in [0, 1], got {mix_prob}")
        checked_num_mix = _check_num_mix(num_mix, num_classes)
        if (init_from_teacher or disentangle) and not _will_have_embedding(
            generator, image_shape, variant
        ):
            raise ZsqError(
                "init_from_teacher and disentangle need a generator with a class embedding, but "
                "this one conditions only through BatchNorm (GDFQ's ImageNet variant or a custom "
                "generator); pass variant='cifar' or leave both options off"
            )
        classifier = find_classifier(teacher, num_classes) if init_from_teacher else None
        latent_dim = _resolve_latent_dim(latent_dim, classifier)
        super().__init__(
            teacher,
            num_classes=num_classes,
            image_shape=image_shape,
            latent_dim=latent_dim,
            bns_weight=bns_weight,
            lr=lr,
            betas=betas,
            generator=generator,
            variant=variant,
            bn_eps=bn_eps,
        )
        self.mix_prob = float(mix_prob)
        self.num_mix = checked_num_mix
        if classifier is not None:
            init_embedding_from(self.embedding, classifier)
        self.mapping: nn.Linear | None = None
        if disentangle:
            self.mapping = identity_linear(self.latent_dim).to(self.device)
            self.optimizer.add_param_group({"params": list(self.mapping.parameters())})

    @property
    def embedding(self) -> nn.Embedding | None:
        """The generator's class embedding, when it has one and ``encode``/``decode`` around it."""
        return _embedding_of(self.generator)

    # --- GdfqSource pieces --------------------------------------------------------------------

    def draw_latent(self, batch_size: int) -> Tensor:
        """K noise vectors per sample, (B, K, latent); plain batches use the first.

        A generator without a class embedding only ever uses the first, so only one is drawn.
        """
        slots = self.num_mix if self.embedding is not None else 1
        return torch.randn(batch_size, slots, self.latent_dim, device=self.device)

    def draw_targets(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Plain GDFQ draw, or (weights, weights, None) for a superposed batch.

        RNG order: the superposed-or-not draw on the CPU generator comes first, then the
        classes and lambdas (``draw_mixture``) on the source's device.
        """
        if not self.draw_superposed():
            return super().draw_targets(batch_size)
        classes, lambdas = self.draw_mixture(batch_size)
        weights = mixture_weights(classes, lambdas, self.num_classes)
        return weights, weights, None

    def generate(self, z: Tensor, cond: Tensor) -> Tensor:
        if cond.dim() == 1:  # hard labels: a plain GDFQ batch
            if self.mapping is None:
                return self.generator(z[:, 0], cond)
            code = self.mapping(self.generator.encode(z[:, 0], cond))
            return self.generator.decode(code, cond)
        if self.embedding is None:
            return self.generator(z[:, 0], cond)
        code = self.superposed_code(z, cond)
        if self.mapping is not None:
            code = self.mapping(code)
        return self.generator.decode(code, cond)

    # --- superposition ------------------------------------------------------------------------

    def draw_superposed(self) -> bool:
        """One CPU-generator draw: True with probability ``mix_prob`` (no device sync)."""
        return bool(torch.rand((), device="cpu") < self.mix_prob)

    def draw_mixture(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """K distinct uniformly random classes (B, K) and weights softmax(randn(K)) (B, K)."""
        scores = torch.rand(batch_size, self.num_classes, device=self.device)
        classes = scores.topk(self.num_mix, dim=1).indices
        lambdas = torch.softmax(torch.randn(batch_size, self.num_mix, device=self.device), dim=1)
        return classes, lambdas

    def superposed_code(self, z: Tensor, weights: Tensor) -> Tensor:
        """``sum_k lambda_k * e_k / ||e_k|| * z_k`` over each row's K weighted classes."""
        lambdas, classes = weights.topk(z.shape[1], dim=1)
        table = self.embedding.weight
        unit = table / table.norm(dim=1, keepdim=True).clamp_min(1e-12)
        slots = unit[classes] * z  # (B, K, latent)
        return (lambdas.to(slots.dtype).unsqueeze(2) * slots).sum(dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mix_prob={self.mix_prob}, num_mix={self.num_mix}"


def mixture_weights(classes: Tensor, lambdas: Tensor, num_classes: int) -> Tensor:
    """(B, num_classes) rows holding ``lambdas`` at ``classes`` (distinct per row), 0 elsewhere."""
    out = torch.zeros(classes.shape[0], num_classes, dtype=lambdas.dtype, device=lambdas.device)
    return out.scatter_(1, classes, lambdas)


def find_classifier(teacher: nn.Module, num_classes: int) -> nn.Linear:
    """The teacher's last ``nn.Linear`` with ``out_features == num_classes``."""
    found = None
    for module in teacher.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = module
    if found is None:
        raise ZsqError(
            f"init_from_teacher: {type(teacher).__name__} has no nn.Linear with out_features="
            f"{num_classes}; check num_classes or pass init_from_teacher=False"
        )
    return found


def init_embedding_from(table: nn.Embedding, classifier: nn.Linear) -> None:
    """Copy the classifier's weight rows (one per class) into the class embedding."""
    if tuple(table.weight.shape) != tuple(classifier.weight.shape):
        raise ZsqError(
            f"init_from_teacher: the class embedding is {tuple(table.weight.shape)} but the "
            f"teacher classifier weight is {tuple(classifier.weight.shape)}; pass "
            f"latent_dim={classifier.in_features} (or leave it unset)"
        )
    with torch.no_grad():
        table.weight.copy_(classifier.weight.detach().to(table.weight))


def identity_linear(features: int) -> nn.Linear:
    """Linear layer starting as the identity, so enabling the mapping changes nothing at step 0."""
    layer = nn.Linear(features, features)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(features))
        layer.bias.zero_()
    return layer


def _embedding_of(generator: nn.Module) -> nn.Embedding | None:
    table = getattr(generator, "embedding", None)
    if isinstance(table, nn.Embedding) and hasattr(generator, "encode"):
        return table if hasattr(generator, "decode") else None
    return None


def _will_have_embedding(
    generator: nn.Module | None, image_shape: Sequence[int], variant: Variant
) -> bool:
    """Checked before the teacher is hooked, so a bad option leaves the teacher untouched."""
    if generator is not None:
        return _embedding_of(generator) is not None
    return resolve_variant(image_shape, variant) == "cifar"


def _check_num_mix(num_mix: int | None, num_classes: int) -> int:
    if num_mix is None:
        return min(2, num_classes)
    if isinstance(num_mix, bool) or not isinstance(num_mix, int) or not 1 <= num_mix <= num_classes:
        raise ZsqError(
            f"num_mix (classes per superposed sample) must be an int in [1, {num_classes}], "
            f"got {num_mix!r}"
        )
    return num_mix


def _resolve_latent_dim(latent_dim: int | None, classifier: nn.Linear | None) -> int:
    """Latent size: the classifier's input size when initialising from it, else GDFQ's 100.

    An explicit ``latent_dim`` that disagrees with the classifier is an error rather than a silent
    projection: a projection would blur the class geometry the initialisation is meant to carry.
    """
    if classifier is None:
        return DEFAULT_LATENT_DIM if latent_dim is None else latent_dim
    if latent_dim is not None and latent_dim != classifier.in_features:
        raise ZsqError(
            f"init_from_teacher: latent_dim={latent_dim} but the teacher classifier takes "
            f"{classifier.in_features} features; pass latent_dim={classifier.in_features} "
            "or leave it unset"
        )
    return classifier.in_features
