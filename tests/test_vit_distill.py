"""ViT distillation: MimiQ's head-wise structural attention loss, and the trainer with it."""

from __future__ import annotations

import pytest
import torch
from tests._teachers import tiny_teacher

from zsq.distill import Distiller
from zsq.distill.attention import structural_attention_loss
from zsq.errors import ZsqError
from zsq.methods import GDFQ, MimiQ
from zsq.quant import QuantSpec, quantize_model
from zsq.synth.noise import GaussianSource

timm = pytest.importorskip("timm")


def _maps(seed: int, batch: int = 2, heads: int = 3, grid: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = 1 + grid * grid
    return torch.softmax(torch.randn(batch, heads, tokens, tokens, generator=gen) * 2, dim=-1)


def test_structural_loss_is_zero_when_student_and_teacher_agree():
    teacher = {"a": _maps(0), "b": _maps(1)}
    student = {k: v.clone().requires_grad_(True) for k, v in teacher.items()}
    loss = structural_attention_loss(student, teacher, 1, (4, 4))
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)


def test_structural_loss_is_positive_and_differentiable_otherwise():
    teacher = {"a": _maps(0)}
    student = {"a": _maps(5).requires_grad_(True)}
    loss = structural_attention_loss(student, teacher, 1, (4, 4))
    assert float(loss.detach()) > 0.1
    loss.backward()
    assert student["a"].grad is not None and student["a"].grad.abs().sum() > 0


def test_structural_loss_needs_every_teacher_layer():
    with pytest.raises(ValueError, match="no attention maps"):
        structural_attention_loss({"a": _maps(0)}, {"a": _maps(0), "b": _maps(1)}, 1, (4, 4))


def _small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=3,
        num_classes=10,
        embed_dim=16,
        depth=2,
        num_heads=2,
    ).eval()


def test_trainer_adds_the_attention_term_and_gi_acts_on_every_linear():
    teacher = _small_vit()
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=8), (3, 8, 8))
    source = GaussianSource(teacher, num_classes=10, image_shape=(3, 8, 8))
    schedule = {"epochs": 3, "iters_per_epoch": 2, "batch_size": 4, "gen_warmup_epochs": 1}
    schedule |= {"act_calib_epochs": 1, "probe_batch_size": 4}
    recipe = MimiQ(recipe="demo", ait=True, overrides=schedule).resolved
    assert recipe.attn_distill == 10.0 and recipe.loss == "kl"
    trainer = Distiller(
        teacher, student, source, recipe, device=torch.device("cpu"), progress=False
    )
    history = trainer.fit()
    last = history[-1]
    assert last["student_attn"] > 0 and last["student_kl"] >= 0
    linears = [n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(linears) <= set(last["kappa"])


def test_attention_distillation_needs_a_vit():
    teacher = tiny_teacher()
    student = quantize_model(teacher, QuantSpec(), (3, 8, 8))
    source = GaussianSource(teacher, num_classes=10, image_shape=(3, 8, 8))
    recipe = GDFQ(recipe="demo", overrides={"attn_distill": 1.0}).resolved
    with pytest.raises(ZsqError, match="attn_distill needs a vision transformer"):
        Distiller(teacher, student, source, recipe, device=torch.device("cpu"), progress=False)
