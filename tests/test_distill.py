"""Student distillation: losses, the Table 2 switches, schedules and exact resume."""

import json

import pytest
import torch
import torch.nn.functional as F

from zsq.demo import digits_cnn
from zsq.distill import Distiller
from zsq.errors import ZsqError
from zsq.methods import GDFQ
from zsq.numerics import kl_to_teacher, soft_cross_entropy
from zsq.quant import QuantSpec, quantize_model
from zsq.recipes import apply_overrides, get_recipe
from zsq.synth import SynthBatch, build_source

TINY = {
    "epochs": 4,
    "iters_per_epoch": 3,
    "batch_size": 8,
    "gen_warmup_epochs": 1,
    "act_calib_epochs": 1,
    "gi_warmup_epochs": 1,
    "lr_milestones": (2, 3),
    "probe_batch_size": 16,
}


def test_kl_reductions_and_temperature():
    torch.manual_seed(0)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    mean = kl_to_teacher(s, t, temperature=4.0, reduction="mean")
    batchmean = kl_to_teacher(s, t, temperature=4.0, reduction="batchmean")
    torch.testing.assert_close(batchmean, mean * 10)  # 'mean' also divides by the classes
    p_t = F.softmax(t / 4, 1)
    by_hand = (p_t * (p_t.log() - F.log_softmax(s / 4, 1))).sum(1).mean() * 16
    torch.testing.assert_close(batchmean, by_hand)
    labels = torch.tensor([0, 3, 9, 1, 1, 2])
    torch.testing.assert_close(
        soft_cross_entropy(s, F.one_hot(labels, 10).float()), F.cross_entropy(s, labels)
    )


def _setup(tmp_path=None, rng_seed=0, **overrides):
    torch.manual_seed(0)
    teacher = digits_cnn().eval()  # the same teacher every time
    torch.manual_seed(rng_seed)
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (1, 8, 8))
    source = build_source("gdfq", teacher, num_classes=10, image_shape=(1, 8, 8))
    recipe = apply_overrides(get_recipe("demo"), {**TINY, **overrides})
    trainer = Distiller(
        teacher,
        student,
        source,
        recipe,
        device=torch.device("cpu"),
        work_dir=tmp_path,
        progress=False,
    )
    return trainer


def _step_with_targets(loss, targets):
    trainer = _setup(loss=loss)
    trainer.apply_schedule(0)  # warm-up: ranges observe
    torch.manual_seed(1)
    images = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        trainer.student(images)
    trainer.apply_schedule(1)  # a student epoch: ranges frozen
    terms, _, _ = trainer.student_step(SynthBatch(images, targets))
    return terms, [p.detach().clone() for p in trainer.student.parameters()]


def test_loss_switch_kl_only_ignores_labels_and_ce_uses_them():
    a = F.one_hot(torch.arange(8) % 10, 10).float()
    b = F.one_hot((torch.arange(8) + 3) % 10, 10).float()
    terms_a, weights_a = _step_with_targets("kl", a)
    _, weights_b = _step_with_targets("kl", b)
    assert set(terms_a) == {"student_kl"}
    assert all(torch.equal(x, y) for x, y in zip(weights_a, weights_b, strict=True))
    terms_c, weights_c = _step_with_targets("ce+kl", a)
    _, weights_d = _step_with_targets("ce+kl", b)
    assert set(terms_c) == {"student_kl", "student_ce"}
    assert not all(torch.equal(x, y) for x, y in zip(weights_c, weights_d, strict=False))
    terms_e, _ = _step_with_targets("ce", a)
    assert set(terms_e) == {"student_ce"}


def test_ait_and_table_switches_resolve_into_the_recipe():
    ait = GDFQ(recipe="paper-cifar", ait=True).resolved
    assert (ait.loss, ait.gi, ait.weight_decay, ait.student_lr) == ("kl", True, 0.0, 1e-4)
    base_gi = GDFQ(recipe="paper-cifar", overrides={"gi": True}).resolved
    assert (base_gi.loss, base_gi.gi) == ("ce+kl", True)  # Table 2 'Baseline + GI'
    imagenet_ait = GDFQ(recipe="paper-imagenet", ait=True).resolved
    assert imagenet_ait.student_lr == 1e-4 and get_recipe("paper-imagenet").student_lr == 1e-6
    trainer = _setup(optimizer="adam", lr_mult=100.0, gi=True)
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.gi is not None
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        get_recipe("demo").student_lr * 100
    )
    assert _setup(gi=False).gi is None
    with pytest.raises(ZsqError, match="unknown recipe field"):
        apply_overrides(get_recipe("short"), ["epoch=3"])
    with pytest.raises(ZsqError, match="optimizer"):
        apply_overrides(get_recipe("short"), {"optimizer": "lion"})


def test_schedule_decays_lr_and_rho_and_freezes_ranges():
    trainer = _setup(gi=True, rho=1e-2)
    lr0 = trainer.optimizer.param_groups[0]["lr"]
    gen0 = trainer.source.optimizer.param_groups[0]["lr"]
    trainer.apply_schedule(0)
    assert trainer.gi.warmup is False  # generator warm-up first, then GI warm-up
    with torch.no_grad():
        trainer.student(torch.randn(4, 1, 8, 8))  # ranges observed during warm-up
    trainer.apply_schedule(1)
    assert trainer.gi.warmup is True and trainer.gi.rho == pytest.approx(1e-2)
    trainer.apply_schedule(3)  # past milestones 2 and 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.01)
    assert trainer.source.optimizer.param_groups[0]["lr"] == pytest.approx(gen0 * 0.01)
    assert trainer.gi.rho == pytest.approx(1e-4) and trainer.gi.warmup is False


def test_fit_logs_metrics_and_freezes_ranges(tmp_path):
    trainer = _setup(tmp_path, gi=True, loss="kl")
    history = trainer.fit()
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    assert "student_kl" not in history[0] and "gen_loss" in history[0]  # warm-up epoch
    last = history[-1]
    assert set(last["kappa"]) == set(last["crossing_fraction"]) == {"0", "3", "7", "12"}
    assert last["probe_kl"] >= 0 and "rho" in last
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    from zsq.quant import act_quantizers

    assert all(not aq.observing for _, aq in act_quantizers(trainer.student))


@pytest.mark.parametrize("gi", [False, True])
def test_resume_is_bit_exact(tmp_path, gi):
    full = _setup(tmp_path / "full", gi=gi)
    full.fit()
    part = _setup(tmp_path / "part", gi=gi)
    part.fit(max_epochs=2)  # interrupted after two epochs
    resumed = _setup(tmp_path / "part", rng_seed=123, gi=gi)  # fresh objects, other RNG
    assert resumed.resume() and resumed.epoch == 2
    resumed.fit()
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for key, value in full.source.state_dict().items():
        assert torch.equal(value, resumed.source.state_dict()[key]), key
    assert [m.get("probe_kl") for m in full.history] == [m.get("probe_kl") for m in resumed.history]


def test_resume_with_other_recipe_is_refused(tmp_path):
    _setup(tmp_path, gi=False).fit(max_epochs=1)
    with pytest.raises(ZsqError, match="different recipe"):
        _setup(tmp_path, gi=True).resume()


def test_resume_names_the_changed_field_and_accepts_a_recipe_from_before_a_new_field(tmp_path):
    """A recipe field added after a checkpoint was written counts at its default (the old run
    behaved so); a real change is named."""
    import io

    from zsq.io import read_verified, write_verified

    _setup(tmp_path, gi=False).fit(max_epochs=1)
    with pytest.raises(ZsqError, match=r"fields \['gi'\]"):
        _setup(tmp_path, gi=True).resume()
    path = tmp_path / "checkpoint" / "last.pt"
    state = torch.load(io.BytesIO(read_verified(path)), weights_only=True)
    recipe = json.loads(state["recipe"])
    assert recipe.pop("attn_distill") is None  # as written before the field existed
    state["recipe"] = json.dumps(recipe)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_verified(path, buffer.getvalue())
    resumed = _setup(tmp_path, gi=False)
    assert resumed.resume() and resumed.epoch == 1


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    import hashlib

    _setup(tmp_path, gi=False).fit(max_epochs=1)
    path = tmp_path / "checkpoint" / "last.pt"
    digest = (tmp_path / "checkpoint" / "last.pt.sha256").read_text().split()[0]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()  # sha256sum's format
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(255 - b for b in data[middle : middle + 2000])
    path.write_bytes(bytes(data))
    with pytest.raises(ZsqError, match="damaged"):
        _setup(tmp_path, gi=False).resume()


def test_resume_refuses_another_teacher_of_the_same_shape(tmp_path):
    _setup(tmp_path, gi=False).fit(max_epochs=1)
    other = _setup(tmp_path, gi=False)
    with torch.no_grad():
        next(other.teacher.parameters()).add_(1e-3)  # the same network, other weights
    with pytest.raises(ZsqError, match="another teacher"):
        other.resume()
    assert _setup(tmp_path, gi=False).resume()  # the original teacher resumes


@pytest.mark.parametrize("method", ["gdfq", "qimera", "arc"])
@pytest.mark.parametrize("ait", [False, True])
def test_every_method_runs_end_to_end(method, ait):
    import zsq
    from zsq.methods import get_method

    torch.manual_seed(0)
    teacher = digits_cnn().eval()
    tiny = {**TINY, "epochs": 2, "iters_per_epoch": 2, "lr_milestones": ()}
    config = get_method(method).config(ait=ait, recipe="demo", overrides=tiny)
    result = zsq.quantize(
        teacher, config, image_shape=(1, 8, 8), num_classes=10, device="cpu", progress=False
    )
    student, history = result.student, result.history
    assert len(history) == 2 and "probe_kl" in history[-1]
    assert ("kappa" in history[-1]) == ait
    assert student(torch.randn(2, 1, 8, 8)).shape == (2, 10)
