"""The paper recipes hold the official code's settings (REFERENCE.md, issue 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zsq.distill.trainer import build_optimizer
from zsq.errors import ZsqError
from zsq.recipes import RECIPES, apply_overrides, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_uses_the_reference_gi_and_weight_decay(name: str) -> None:
    recipe = get_recipe(name)
    assert recipe.gi_warmup_epochs == 1  # the cap lifts one epoch after the generator warm-up
    assert recipe.weight_decay == 0.0  # every config of the AIT repository
    assert (recipe.gi_count, recipe.gi_search) == ("codes", "reference")


def test_paper_cifar_schedule_is_the_papers() -> None:
    r = get_recipe("paper-cifar")
    assert (r.epochs, r.iters_per_epoch, r.batch_size) == (400, 200, 200)
    assert (r.gen_warmup_epochs, r.lr_milestones, r.lr_gamma) == (4, (100, 200, 300), 0.1)
    assert (r.student_lr, r.momentum, r.rho, r.temperature) == (1e-4, 0.9, 1e-3, 20.0)


def _optimizer(name: str) -> torch.optim.Optimizer:
    params = list(nn.Linear(2, 2).parameters())
    return build_optimizer(params, apply_overrides(get_recipe("short"), {"optimizer": name}))


def test_optimisers_take_the_reference_hyperparameters() -> None:
    sgd = _optimizer("sgd").param_groups[0]
    assert (sgd["momentum"], sgd["nesterov"], sgd["weight_decay"]) == (0.9, True, 0.0)
    adam = _optimizer("adam").param_groups[0]
    assert adam["eps"] == 1e-5
    rms = _optimizer("rmsprop").param_groups[0]
    assert (rms["alpha"], rms["eps"], rms["momentum"]) == (0.9, 1.0, 0.9)


@pytest.mark.parametrize(
    "override, match",
    [({"gi_count": "bits"}, "gi_count"), ({"gi_search": "golden"}, "gi_search")],
)
def test_unknown_gi_options_are_user_errors(override: dict, match: str) -> None:
    with pytest.raises(ZsqError, match=match):
        apply_overrides(get_recipe("short"), override)
