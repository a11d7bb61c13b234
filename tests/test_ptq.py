"""Min/max post-training quantization on a really trained model (the digits demo teacher)."""

import pytest
import torch

from zsq.data import load_dataset
from zsq.demo import DIGITS_MEAN, DIGITS_STD, IMAGE_SHAPE, train_teacher
from zsq.evaluate import evaluate
from zsq.ptq import gaussian_batches, minmax_quantize
from zsq.quant import QuantSpec, act_quantizers


@pytest.fixture(scope="module")
def digits():
    norm = {"normalize_mean": DIGITS_MEAN, "normalize_std": DIGITS_STD}
    train = load_dataset("digits", split="train", **norm)
    test = load_dataset("digits", split="test", **norm)
    teacher = train_teacher(train, device=torch.device("cpu"), seed=0)
    return teacher, test


def test_w8a8_within_half_a_point_of_fp32(digits):
    teacher, test = digits
    fp32 = evaluate(teacher, test, progress=False).top1
    assert fp32 > 95  # the teacher really learned
    student = minmax_quantize(
        teacher,
        QuantSpec(wbits=8, abits=8),
        gaussian_batches(512, IMAGE_SHAPE),
        image_shape=IMAGE_SHAPE,
    )
    w8a8 = evaluate(student, test, progress=False).top1
    assert abs(fp32 - w8a8) <= 0.5, (fp32, w8a8)


def test_calibration_freezes_ranges_and_leaves_teacher_alone(digits):
    teacher, _ = digits
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = minmax_quantize(
        teacher,
        QuantSpec(wbits=2, abits=2),
        gaussian_batches(64, IMAGE_SHAPE, batch_size=16),
        image_shape=IMAGE_SHAPE,
    )
    for _, aq in act_quantizers(student):
        assert not aq.observing and int(aq.num_observed) == 4
        assert aq.x_min < aq.x_max
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])
