"""The teacher's score is measured once per teacher and data set, then read from the cache."""

import json

import pytest
import torch

import zsq
from zsq.demo import digits_cnn
from zsq.methods import MinMax
from zsq.run import quantize as run_quantize
from zsq.run.scores import FILE, cache_dir
from zsq.runtime import module_digest


def _run(teacher, **kwargs):
    return zsq.quantize(
        teacher, MinMax(calib_size=16), image_shape=(1, 8, 8), num_classes=10,
        eval_data="digits", device="cpu", progress=False, **kwargs,
    )  # fmt: skip


@pytest.fixture
def counted(monkeypatch):
    """Counts the evaluations the run layer makes (the real evaluate runs)."""
    calls = []
    real = run_quantize.evaluate

    def evaluate(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(run_quantize, "evaluate", evaluate)
    return calls


def test_the_teacher_is_measured_once_per_teacher_and_data(counted, monkeypatch, tmp_path):
    monkeypatch.setenv("ZSQ_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    teacher = digits_cnn().eval()
    first = _run(teacher).report
    assert len(counted) == 2 and first["teacher_score"] == "measured"
    second = _run(teacher, seed=3).report
    assert len(counted) == 3  # the student only
    assert second["teacher_score"].startswith("measured before")
    assert (second["teacher_top1"], second["teacher_top5"]) == (
        first["teacher_top1"],
        first["teacher_top5"],
    )
    with torch.no_grad():
        teacher[0].weight[0, 0, 0, 0] += 1.0  # another teacher: measured again
    assert _run(teacher).report["teacher_score"] == "measured" and len(counted) == 5


def test_a_damaged_cache_is_ignored_and_rewritten(counted, monkeypatch, tmp_path):
    monkeypatch.setenv("ZSQ_CACHE_DIR", str(tmp_path))
    (tmp_path / FILE).write_text("{not json")
    torch.manual_seed(0)
    assert _run(digits_cnn().eval()).report["teacher_score"] == "measured"
    assert len(json.loads((cache_dir() / FILE).read_text())) == 1


def test_the_digest_covers_every_tensor_byte():
    torch.manual_seed(0)
    model = digits_cnn()
    before = module_digest(model)
    with torch.no_grad():
        model[1].running_mean[0] += 1e-6  # a buffer, not a parameter
    assert module_digest(model) != before
