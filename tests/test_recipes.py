"""The paper recipes hold the official code's settings (REFERENCE.md, issue 10)."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch
from torch import nn

import zsq
from zsq.demo import digits_cnn
from zsq.distill.trainer import build_optimizer
from zsq.errors import ZsqError
from zsq.methods import get_method, method_names
from zsq.recipes import (
    FIELD_BOUNDS,
    FIELD_CHOICES,
    RECIPES,
    DistillRecipe,
    apply_overrides,
    get_recipe,
    parse_overrides,
)


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


# --- every field's range (a user review: these ran, temperature=0 to a NaN student) -----------

OUT_OF_RANGE = [
    ("temperature", "0"),
    ("temperature", "-2"),
    ("momentum", "2"),
    ("momentum", "-1"),
    ("momentum", "0"),  # Nesterov SGD needs momentum
    ("weight_decay", "-0.1"),
    ("lr_gamma", "0"),
    ("lr_gamma", "-1"),
    ("lr_gamma", "1.5"),
    ("gen_warmup_epochs", "-1"),
    ("gi_warmup_epochs", "-1"),
    ("act_calib_epochs", "0"),
    ("lr_milestones", "-5"),
    ("lr_milestones", "3,-5"),
    ("epochs", "0"),
    ("iters_per_epoch", "0"),
    ("batch_size", "-4"),
    ("student_lr", "0"),
    ("lr_mult", "-1"),
    ("gen_lr", "0"),
    ("bns_weight", "-0.1"),
    ("rho", "1"),
    ("max_kappa", "0.5"),
    ("eval_every", "0"),
    ("probe_batch_size", "0"),
    ("analyze_every", "-1"),
    ("attn_distill", "-1"),
]


@pytest.mark.parametrize(("field", "text"), OUT_OF_RANGE)
@pytest.mark.parametrize("given_as", ["--set text", "API value"])
def test_out_of_range_fields_are_one_line_errors_naming_the_field(field, text, given_as) -> None:
    cli = [f"{field}={text}"]
    overrides = cli if given_as == "--set text" else parse_overrides(cli)  # typed, as the API's
    with pytest.raises(ZsqError, match=f"recipe field {field}=") as info:
        apply_overrides(get_recipe("short"), overrides)
    assert "\n" not in str(info.value) and "must be" in str(info.value)


@pytest.mark.parametrize(
    "edge",
    [
        {"momentum": 0.99, "lr_gamma": 1.0, "weight_decay": 0.0, "bns_weight": 0.0},
        {"gen_warmup_epochs": 0, "gi_warmup_epochs": 0, "max_kappa": 1.0},
        {"lr_milestones": (0, 22, 100)},  # from the start, and never within the run
        {"lr_milestones": (), "analyze_every": None, "attn_distill": 0.0},
    ],
)
def test_range_edges_are_accepted(edge) -> None:
    assert apply_overrides(get_recipe("short"), edge).to_dict().items() >= edge.items()


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("method", method_names("distillation"))
@pytest.mark.parametrize("ait", [False, True])
def test_every_built_in_recipe_validates(name, method, ait) -> None:
    recipe = get_method(method).config(recipe=name, ait=ait).resolved
    assert replace(recipe) == recipe  # __post_init__ runs again on a copy


def test_every_field_has_a_range_or_choices() -> None:
    numeric = {f.name for f in fields(DistillRecipe) if f.type not in ("str", "bool")}
    assert set(FIELD_BOUNDS) == numeric
    strings = {f.name for f in fields(DistillRecipe) if f.type == "str"} - {"name"}
    assert set(FIELD_CHOICES) == strings


def test_the_api_refuses_a_bad_momentum_before_any_work(tmp_path, monkeypatch) -> None:
    def training_started(*args, **kwargs):
        raise AssertionError("the recipe was refused only after training began")

    monkeypatch.setattr("zsq.methods.distillation.Distiller", training_started)
    with pytest.raises(ZsqError, match="recipe field momentum=-1.0 must be in"):
        zsq.quantize(
            digits_cnn(),
            zsq.GDFQ(recipe="demo", overrides={"momentum": -1}),
            image_shape=(1, 8, 8),
            num_classes=10,
            work_dir=tmp_path / "run",
            device="cpu",
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []
