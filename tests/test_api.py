"""zsq.quantize takes a method config, refuses what the CLI refuses, early, and in one line."""

import logging

import pytest
import torch
from tests._interrupt import interrupt_at_call

import zsq
from zsq.cli import build_parser
from zsq.demo import digits_cnn
from zsq.errors import ZsqError
from zsq.execution import Execution
from zsq.methods import GDFQ, LAPQ, MinMax, Qimera, method_names
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


def quantize(teacher, method, **kwargs):
    options = {"image_shape": (1, 8, 8), "num_classes": 10, "device": "cpu", "progress": False}
    return zsq.quantize(teacher, method, **{**options, **kwargs})


def test_cli_and_api_share_one_list_of_methods():
    quantize_parser = build_parser()._subparsers._group_actions[0].choices["quantize"]
    method = next(a for a in quantize_parser._actions if a.dest == "method")
    assert tuple(method.choices) == method_names()
    assert method_names() == (
        "minmax",
        "zeroq",
        "lapq",
        "genie",
        "gdfq",
        "qimera",
        "arc",
        "psaq",
        "mimiq",
    )


def test_minmax_through_the_api_is_the_gaussian_baseline(teacher):
    result = quantize(teacher, MinMax(), quant=QuantSpec(wbits=4, abits=4), seed=5)
    reference = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (1, 8, 8))
    calibrate_activations(reference, gaussian_batches(512, (1, 8, 8), 128, seed=5))
    assert result.report["calibration"].startswith("gaussian noise, 512")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(result.student(x), reference(x))
    for key, value in reference.state_dict().items():
        assert torch.equal(result.student.state_dict()[key], value), key


@pytest.mark.parametrize(
    "option",
    [
        {"recipe": "short"},
        {"ait": True},
        {"overrides": {"epochs": 3}},
        {"source_options": {"mix_prob": 0.4}},
        {"execution": Execution(precision="bf16")},
        {"init": LAPQ()},
    ],
)
def test_minmax_refuses_distillation_options_like_the_cli(option):
    name = next(iter(option))
    with pytest.raises(ZsqError) as info:
        MinMax.from_fields(option)
    message = str(info.value)
    assert message.startswith(f"{name} has no effect with method minmax") and "\n" not in message


def test_arguments_are_checked_before_any_work(teacher, tmp_path, monkeypatch):
    def training_started(*args, **kwargs):
        raise AssertionError("the arguments were refused only after training began")

    monkeypatch.setattr("zsq.methods.distillation.Distiller", training_started)
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    cases = [
        ({"method": "bogus"}, "method must be a method config such as zsq.GDFQ()"),
        ({"work_dir": str(file)}, "is a file"),
        ({"work_dir": file / "sub"}, "cannot write"),
        ({"resume": True}, "resume=True needs the run's work_dir"),
        ({"image_shape": (3, 8, 8)}, "3 channel(s) but the model's first layer takes 1"),
        ({"image_shape": (1, 0, 8)}, "image_shape"),
        ({"num_classes": 0}, "num_classes"),
        ({"quant": QuantSpec(overrides={"conv*": {"wbits": 8}})}, "'conv*' (quant.overrides)"),
        ({"quant": 4}, "quant must be a zsq.quant.QuantSpec"),
        ({"seed": 10**20}, "seed must be a whole number"),
    ]
    for kwargs, expected in cases:
        method = kwargs.pop("method", GDFQ(overrides=TINY))
        with pytest.raises(ZsqError) as info:
            quantize(teacher, method, **kwargs)
        assert expected in str(info.value), (kwargs, str(info.value))
    with pytest.raises(ZsqError, match="unknown recipe"):
        GDFQ(recipe="fast")
    assert file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [file]


def test_a_teacher_given_by_name_is_a_one_line_error():
    with pytest.raises(ZsqError, match="teacher must be a torch.nn.Module, got str 'resnet20'"):
        quantize("resnet20", GDFQ())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("device", [torch.device("cuda"), 0, "cuda:1", object()])
def test_a_device_that_is_not_there_is_a_one_line_error(teacher, device):
    with pytest.raises(ZsqError, match="device"):
        zsq.quantize(teacher, MinMax(), image_shape=(1, 8, 8), num_classes=10, device=device)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MinMax(calib_size="8"), "calib_size must be a positive whole number"),
        (lambda: GDFQ(overrides=5), "overrides must be a dict"),
        (lambda: LAPQ(maxiter="many"), "LAPQ option maxiter takes a whole number"),
        (lambda: GDFQ(ait="yes"), "ait must be True or False"),
        (lambda: GDFQ(init=MinMax()), "init must be the config of a method a distillation"),
    ],
)
def test_config_values_of_the_wrong_type_are_one_line_errors(make, match):
    with pytest.raises(ZsqError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", [MinMax(), LAPQ(stages="lw")])
def test_a_class_count_the_teacher_does_not_have_is_refused(teacher, method):
    with pytest.raises(ZsqError, match="num_classes=100"):
        zsq.quantize(teacher, method, image_shape=(1, 8, 8), num_classes=100)


def test_overrides_of_the_wrong_type_fail_as_on_the_cli():
    with pytest.raises(ZsqError) as api:
        GDFQ(overrides={"batch_size": "eight"})
    with pytest.raises(ZsqError) as cli:
        parse_overrides(["batch_size=eight"])
    assert (
        str(api.value)
        == str(cli.value)
        == ("recipe field 'batch_size' takes a whole number, got 'eight'; e.g. batch_size=200")
    )
    for bad, words in [({"epochs": 2.5}, "whole number"), ({"gi": "maybe"}, "true or false")]:
        with pytest.raises(ZsqError, match=words):
            GDFQ(overrides=bad)


def test_str_work_dir_run_logs_its_size_and_an_estimate(teacher, tmp_path, caplog):
    work = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        result = quantize(teacher, GDFQ(recipe="demo", overrides=TINY), work_dir=str(work))
    assert len(result.history) == 2 and (work / "metrics.jsonl").is_file()
    assert (work / "report.json").is_file() and (work / "student.safetensors").is_file()
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 epochs x 3 iterations x batch 4 = 6 iterations" in m for m in messages)
    estimates = [m for m in messages if "iterations left" in m]
    assert len(estimates) == 2  # once for the generator warm-up, once for student epochs
    assert "warm-up" in estimates[0] and "student" in estimates[1]


def test_default_recipe_is_announced_and_tf32_on_cpu_noted(teacher, caplog, monkeypatch):
    def stop(*args, **kwargs):
        raise RuntimeError("stop before training")

    monkeypatch.setattr("zsq.methods.distillation.build_source", stop)
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="stop"):
        quantize(teacher, GDFQ(execution=Execution(precision="tf32")))
    text = caplog.text
    assert "no recipe given: using paper-cifar" in text and "80,000 iterations" in text
    assert "tf32 has no effect on cpu" in text


def test_a_generator_run_keeps_its_trained_generator(teacher, tmp_path):
    from safetensors.torch import load_file

    from zsq.synth import build_source

    work = tmp_path / "run"
    quantize(teacher, GDFQ(recipe="demo", overrides=TINY), work_dir=str(work), seed=0)
    state = load_file(str(work / "generator.safetensors"))
    fresh = build_source("gdfq", teacher, num_classes=10, image_shape=(1, 8, 8))
    fresh.load_state_dict(state)  # strict: the whole generator, nothing else
    fresh.close()


def test_the_api_run_folder_is_the_clis_and_resumes(teacher, tmp_path, monkeypatch):
    """A work_dir is a run folder as --out makes it: written atomically, refused when it
    exists (unless overwrite), resumed exactly after an interruption."""
    from zsq.distill import Distiller

    method = Qimera(recipe="demo", overrides={**TINY, "epochs": 3})
    work = tmp_path / "run"
    plain = quantize(teacher, method, work_dir=tmp_path / "plain").student
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, Distiller, "train_epoch", 2)  # in epoch index 1
        with pytest.raises(KeyboardInterrupt):
            quantize(teacher, method, work_dir=work)
    assert not work.exists() and (tmp_path / "run.partial" / "checkpoint" / "last.pt").is_file()
    resumed = quantize(teacher, method, work_dir=work, resume=True)
    assert len(resumed.report["sessions"]) == 2
    for key, value in plain.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key
    with pytest.raises(ZsqError, match="already exists; pass overwrite=True"):
        quantize(teacher, method, work_dir=work)
    assert quantize(teacher, MinMax(), work_dir=work, overwrite=True).report["method"] == "minmax"
