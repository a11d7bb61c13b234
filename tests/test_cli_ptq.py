"""zeroq, lapq and --init lapq through the CLI: outputs, reports, reuse of calibration images."""

import json

import numpy as np
import pytest
import torch
from tests.test_cli import tiny_distill_args

from zsq.cli import main
from zsq.io import partial_dir

ZEROQ_FAST = ["--source-opt", "steps=3"]
LAPQ_FAST = ["--lapq-opt", "maxfev=10", "--lapq-opt", "p_grid=2,3,4"]


def run(argv, capsys):
    code = main([*argv, "--quiet", "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_zeroq_keeps_its_distilled_images_and_reports_the_bn_mismatch(
    small_teacher, tmp_path, capsys
):
    out = tmp_path / "zeroq"
    argv = ["quantize", *small_teacher, "--method", "zeroq", "--calib-size", "8", *ZEROQ_FAST]
    report = run([*argv, "--out", str(out)], capsys)
    assert report["method"] == "zeroq" and report["real_data"] is False
    assert report["calibration"] == "zeroq, 8 synthetic images (data-free)"
    mismatch = report["calibration_report"]["bn_mismatch"]
    assert len(mismatch) == 3 and all("mean_abs_error_std" in v for v in mismatch.values())
    assert (out / "calibration.safetensors").is_file()
    assert not (out / "checkpoint").exists()  # the resume marker goes when the run completes


def test_lapq_on_real_labelled_data_says_so(small_teacher, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "train.npz", x=rng.integers(0, 255, (16, 8, 8), np.uint8), y=np.arange(16) % 10
    )
    out = tmp_path / "lapq"
    argv = ["quantize", *small_teacher, "--method", "lapq", "--calib", f"npz:{tmp_path}/train.npz"]
    report = run([*argv, *LAPQ_FAST, "--out", str(out)], capsys)
    assert report["real_data"] is True and report["calibration"].startswith("REAL DATA: 16")
    lapq = report["lapq"]
    assert lapq["config"]["layers"] == "all" and lapq["powell_evaluations"] <= 11
    assert lapq["loss_final"] <= lapq["loss_quadratic"]
    assert "YES" in (out / "report.md").read_text()
    assert not (out / "calibration.safetensors").exists()  # real data is not copied


def test_an_interrupted_lapq_run_resumes_without_making_its_images_again(
    small_teacher, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "lapq"
    argv = ["quantize", *small_teacher, "--method", "lapq", "--calib-size", "8", *ZEROQ_FAST]
    argv += LAPQ_FAST

    import zsq.ptq.lapq as lapq_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lapq_module.Lapq, "run", stop)
    assert main([*argv, "--out", str(out), "--quiet", "--device", "cpu"]) == 130
    capsys.readouterr()
    kept = partial_dir(out) / "calibration.safetensors"
    assert kept.is_file()
    made = kept.read_bytes()
    monkeypatch.undo()
    report = run([*argv, "--resume", str(out)], capsys)
    assert (out / "calibration.safetensors").read_bytes() == made
    assert len(report["sessions"]) == 2


def test_init_lapq_starts_gdfq_from_lapqs_student(small_teacher, tmp_path, capsys):
    out = tmp_path / "init"
    argv = tiny_distill_args(small_teacher, epochs=2)
    argv += ["--init", "lapq", "--calib-size", "8", "--calib-opt", "steps=3", *LAPQ_FAST]
    argv += ["--out", str(out)]
    argv = [a for a in argv if a not in ("--quiet", "--device", "cpu")]
    report = run(argv, capsys)
    init = report["init"]
    assert init["method"] == "lapq" and init["real_data"] is False
    assert init["calibration"].startswith("zeroq, 8 synthetic images")
    assert "loss_final" in init["lapq"]


def test_carry_over_copies_deployed_weights_and_activation_ranges():
    from tests._teachers import tiny_teacher

    from zsq.methods.lapq import carry_over as carry_over_lapq
    from zsq.ptq import CalibrationSet, LapqConfig, lapq_quantize
    from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model

    teacher = tiny_teacher()
    spec = QuantSpec(wbits=4, abits=4)
    data = CalibrationSet(torch.randn(16, 3, 8, 8), None, "noise", real=False)
    lapq, _ = lapq_quantize(teacher, spec, data, LapqConfig(stages="lw"), progress=False)
    student = quantize_model(teacher, spec, (3, 8, 8))
    carry_over_lapq(lapq, student)
    for (name, ours), (_, theirs) in zip(quant_layers(student), quant_layers(lapq), strict=True):
        assert torch.equal(ours.weight, theirs.fake_quant_weight()), name
    for (name, ours), (_, theirs) in zip(
        act_quantizers(student), act_quantizers(lapq), strict=True
    ):
        assert float(ours.x_min) == 0.0 and float(ours.x_max) == float(theirs.x_max), name
        assert int(ours.num_observed) == 1 and ours.observing


@pytest.mark.parametrize("method", ["zeroq", "lapq"])
def test_api_returns_the_report_and_no_epochs(method):
    from tests._teachers import tiny_teacher

    import zsq
    from zsq.methods import get_method

    options = {"stages": "lw"} if method == "lapq" else {}
    config = get_method(method).config(calib_size=8, calib_options={"steps": 2}, **options)
    result = zsq.quantize(
        tiny_teacher(), config, image_shape=(3, 8, 8), num_classes=10, device="cpu",
        progress=False,
    )  # fmt: skip
    assert result.history == [] and result.report["real_data"] is False
    assert ("lapq" in result.report) == (method == "lapq")
