"""zero_shot_quantize takes the CLI's method names and refuses what the CLI refuses, early."""

import logging

import pytest
import torch

from zsq.api import zero_shot_quantize
from zsq.cli import build_parser
from zsq.demo import digits_cnn
from zsq.errors import ZsqError
from zsq.execution import Execution
from zsq.methods import METHOD_NAMES
from zsq.ptq import calibrate_activations, gaussian_batches
from zsq.quant import QuantSpec, quantize_model
from zsq.recipes import parse_overrides

TINY = {
    "epochs": 2,
    "iters_per_epoch": 3,
    "batch_size": 4,
    "gen_warmup_epochs": 1,
    "act_calib_epochs": 1,
    "lr_milestones": (),
    "probe_batch_size": 8,
}


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return digits_cnn().eval()


def quantize(teacher, **kwargs):
    options = {"image_shape": (1, 8, 8), "num_classes": 10, "device": "cpu", "progress": False}
    return zero_shot_quantize(teacher, **{**options, **kwargs})


def test_cli_and_api_share_one_list_of_methods():
    quantize_parser = build_parser()._subparsers._group_actions[0].choices["quantize"]
    method = next(a for a in quantize_parser._actions if a.dest == "method")
    assert tuple(method.choices) == METHOD_NAMES
    assert METHOD_NAMES == ("minmax", "zeroq", "lapq", "gdfq", "qimera", "arc", "psaq", "mimiq")


def test_minmax_through_the_api_is_the_gaussian_baseline(teacher):
    student, history = quantize(teacher, method="minmax", wbits=4, abits=4, seed=5)
    reference = quantize_model(teacher, QuantSpec(wbits=4, abits=4))
    calibrate_activations(reference, gaussian_batches(512, (1, 8, 8), 128, seed=5))
    assert history[0]["calibration"].startswith("gaussian noise, 512")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(student(x), reference(x))
    for key, value in reference.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key


@pytest.mark.parametrize(
    "option",
    [
        {"recipe": "short"},
        {"ait": True},
        {"overrides": {"epochs": 3}},
        {"source_options": {"mix_prob": 0.4}},
        {"execution": Execution(precision="bf16")},
        {"work_dir": "runs/x"},
        {"evaluate": lambda student: 0.0},
    ],
)
def test_minmax_refuses_distillation_options_like_the_cli(teacher, option):
    name = next(iter(option))
    with pytest.raises(ZsqError) as info:
        quantize(teacher, method="minmax", **option)
    message = str(info.value)
    assert message.startswith(f"{name} has no effect with method minmax") and "\n" not in message


def test_arguments_are_checked_before_any_work(teacher, tmp_path, monkeypatch):
    def training_started(*args, **kwargs):
        raise AssertionError("the arguments were refused only after training began")

    monkeypatch.setattr("zsq.api.Distiller", training_started)
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    cases = [
        (
            {"method": "bogus"},
            "unknown method 'bogus'; choose one of minmax, zeroq, lapq, gdfq, qimera, arc",
        ),
        ({"work_dir": str(file)}, "is a file"),
        ({"work_dir": file / "sub"}, "cannot be created"),
        ({"resume": True}, "needs the work_dir"),
        ({"image_shape": (3, 8, 8)}, "3 channel(s) but the model's first layer takes 1"),
        ({"image_shape": (1, 0, 8)}, "image_shape"),
        ({"num_classes": 0}, "num_classes"),
        ({"spec": QuantSpec(), "wbits": 8}, "not both"),
        ({"spec": QuantSpec(overrides={"conv*": {"wbits": 8}})}, "'conv*' (--layer) matches no"),
        ({"recipe": "fast"}, "unknown recipe"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(ZsqError) as info:
            quantize(teacher, method=kwargs.pop("method", "gdfq"), overrides=TINY, **kwargs)
        assert expected in str(info.value), (kwargs, str(info.value))
    assert file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [file]


def test_a_teacher_given_by_name_is_a_one_line_error():
    with pytest.raises(ZsqError, match="teacher must be a torch.nn.Module, got str 'resnet20'"):
        quantize("resnet20")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("device", [torch.device("cuda"), 0, "cuda:1", object()])
def test_a_device_that_is_not_there_is_a_one_line_error(teacher, device):
    with pytest.raises(ZsqError, match="device"):
        zero_shot_quantize(
            teacher, image_shape=(1, 8, 8), num_classes=10, method="minmax", device=device
        )


@pytest.mark.parametrize(
    ("argument", "match"),
    [
        ({"calib_size": "8"}, "calib_size must be int"),
        ({"seed": "x"}, "seed must be int"),
        ({"overrides": 5, "method": "gdfq"}, "overrides must be dict or list"),
        ({"lapq": 5, "method": "lapq"}, "lapq must be LapqConfig or dict"),
        ({"evaluate": 5, "method": "gdfq"}, "evaluate must be a function"),
    ],
)
def test_arguments_of_the_wrong_type_are_one_line_errors(teacher, argument, match):
    options = {"method": "minmax", **argument}
    with pytest.raises(ZsqError, match=match):
        zero_shot_quantize(teacher, image_shape=(1, 8, 8), num_classes=10, **options)


@pytest.mark.parametrize("method", ["minmax", "lapq"])
def test_a_class_count_the_teacher_does_not_have_is_refused(teacher, method):
    with pytest.raises(ZsqError, match="num_classes=100"):
        zero_shot_quantize(teacher, image_shape=(1, 8, 8), num_classes=100, method=method)


def test_overrides_of_the_wrong_type_fail_as_on_the_cli(teacher):
    with pytest.raises(ZsqError) as api:
        quantize(teacher, overrides={"batch_size": "eight"})
    with pytest.raises(ZsqError) as cli:
        parse_overrides(["batch_size=eight"])
    assert (
        str(api.value)
        == str(cli.value)
        == ("recipe field 'batch_size' takes a whole number, got 'eight'; e.g. batch_size=200")
    )
    for bad, words in [({"epochs": 2.5}, "whole number"), ({"gi": "maybe"}, "true or false")]:
        with pytest.raises(ZsqError, match=words):
            quantize(teacher, overrides=bad)


def test_str_work_dir_run_logs_its_size_and_an_estimate(teacher, tmp_path, caplog):
    work = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        student, history = quantize(teacher, recipe="demo", overrides=TINY, work_dir=str(work))
    assert len(history) == 2 and (work / "metrics.jsonl").is_file()
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 epochs x 3 iterations x batch 4 = 6 iterations" in m for m in messages)
    estimates = [m for m in messages if "iterations left" in m]
    assert len(estimates) == 2  # once for the generator warm-up, once for student epochs
    assert "warm-up" in estimates[0] and "student" in estimates[1]


def test_default_recipe_is_announced_and_tf32_on_cpu_noted(teacher, caplog, monkeypatch):
    import zsq.api

    def stop(*args, **kwargs):
        raise RuntimeError("stop before training")

    monkeypatch.setattr(zsq.api, "build_source", stop)
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="stop"):
        quantize(teacher, execution=Execution(precision="tf32"))
    text = caplog.text
    assert "no recipe given: using paper-cifar" in text and "80,000 iterations" in text
    assert "tf32 has no effect on cpu" in text


def test_a_generator_run_keeps_its_trained_generator(teacher, tmp_path):
    from safetensors.torch import load_file

    from zsq.synth import build_source

    work = tmp_path / "run"
    quantize(teacher, method="gdfq", recipe="demo", overrides=TINY, work_dir=str(work), seed=0)
    state = load_file(str(work / "generator.safetensors"))
    fresh = build_source("gdfq", teacher, num_classes=10, image_shape=(1, 8, 8))
    fresh.load_state_dict(state)  # strict: the whole generator, nothing else
    fresh.close()
