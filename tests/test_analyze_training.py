"""analyze_every: CE/KL gradient cosines and the inter-epoch gradient cosine, measured beside
the update and never changing it."""

import torch
from tests.test_api import TINY

import zsq
from zsq.demo import digits_cnn


def run(**overrides):
    torch.manual_seed(0)
    teacher = digits_cnn().eval()
    method = zsq.GDFQ(ait=True, recipe="demo", overrides={**TINY, "epochs": 4, **overrides})
    result = zsq.quantize(
        teacher, method, image_shape=(1, 8, 8), num_classes=10, device="cpu", progress=False
    )
    return result.student, result.history


def test_measuring_gradients_leaves_the_student_bit_identical():
    plain, plain_history = run()
    measured, history = run(analyze_every=1)
    for key, value in plain.state_dict().items():
        assert torch.equal(measured.state_dict()[key], value), key
    student_epochs = [m for m in history if "grad_cos_ce_kl" in m]
    assert len(student_epochs) == 3  # epochs 2-4 train the student (1 warm-up epoch)
    for m in student_epochs:
        assert len(m["grad_cos_ce_kl_steps"]) == TINY["iters_per_epoch"]
        assert all(-1.0 <= c <= 1.0 for c in m["grad_cos_ce_kl_steps"])
    assert student_epochs[0]["grad_cos_epoch"] is None  # no previous epoch to compare with
    assert all(-1.0 <= m["grad_cos_epoch"] <= 1.0 for m in student_epochs[1:])
    assert not any("grad_cos_ce_kl" in m for m in plain_history)


def test_every_nth_step_is_measured():
    _, history = run(analyze_every=2)
    m = next(m for m in history if "grad_cos_ce_kl" in m)
    assert len(m["grad_cos_ce_kl_steps"]) == (TINY["iters_per_epoch"] + 1) // 2
