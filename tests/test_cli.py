"""The command line: real runs on the shared checkpoints, and every bad input exits 2 cleanly."""

import json
import subprocess
import sys

import pytest
import torch

from zsq.cli import main


def run_cli(*args):
    """Run ``python -m zsq ARGS`` in a subprocess (the real entry point, exit code included)."""
    return subprocess.run(
        [sys.executable, "-m", "zsq", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def tiny_distill_args(teacher_args, epochs):
    """A GDFQ+AIT run of a few seconds on the small teacher."""
    sets = [
        f"epochs={epochs}",
        "iters_per_epoch=2",
        "batch_size=4",
        "gen_warmup_epochs=1",
        "act_calib_epochs=1",
        "probe_batch_size=8",
    ]
    return [
        "quantize",
        *teacher_args,
        "--method",
        "gdfq",
        "--ait",
        "--recipe",
        "demo",
        *[arg for item in sets for arg in ("--set", item)],
        "--quiet",
        "--device",
        "cpu",
    ]


@pytest.fixture
def akamaster(shared_data):
    return shared_data / "weights" / "resnet20_cifar10_akamaster.th"


def test_eval_reproduces_the_public_checkpoint(shared_data, akamaster):
    data = f"npz:{shared_data / 'cifar10-exact/test_first846.npz'}"
    result = run_cli(
        "eval",
        "--model",
        "resnet20",
        "--weights",
        akamaster,
        "--data",
        data,
        "--json",
        "--quiet",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["top1"] == 91.73 and report["n"] == 846


def test_quantize_minmax_writes_every_output(tmp_path, shared_data, akamaster, capsys):
    out = tmp_path / "w8a8"
    data = f"npz:{shared_data / 'cifar10-exact/test_first846.npz'}"
    code = main(
        [
            "quantize",
            "--model",
            "resnet20",
            "--weights",
            str(akamaster),
            "--wbits",
            "8",
            "--abits",
            "8",
            "--method",
            "minmax",
            "--out",
            str(out),
            "--eval-data",
            data,
            "--eval-limit",
            "200",
            "--calib-size",
            "64",
            "--quiet",
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "method",
        "wbits",
        "abits",
        "teacher_top1",
        "student_top1",
        "n_eval",
        "seconds",
        "device",
        "seed",
        "calibration",
    ):
        assert key in report
    assert report["n_eval"] == 200 and "data-free" in report["calibration"]
    assert report["image_shape"] == [3, 32, 32] and report["eval_transform"].startswith("none")
    assert sorted(p.name for p in out.iterdir()) == [
        ".zsq-run",  # the run's marker (its options and sessions)
        "quant.json",
        "report.json",
        "report.md",
        "student.safetensors",
    ]
    quant = json.loads((out / "quant.json").read_text())
    assert quant["layers"]["conv1"]["wbits"] == 8 and len(quant["layers"]) == 20
    from safetensors.torch import load_file

    state = load_file(out / "student.safetensors")
    assert state["linear.weight"].shape == (10, 64)
    assert not (tmp_path / "w8a8.partial").exists()


def test_gdfq_ait_cli_run_and_resume(tmp_path, small_teacher, capsys):
    args = tiny_distill_args(small_teacher, epochs=3)
    out = tmp_path / "ait"
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "gdfq+ait" and report["recipe"]["gi"] is True
    assert report["recipe"]["loss"] == "kl" and report["epochs_run"] == 3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and "kappa" in metrics[-1]
    assert not (out / "checkpoint").exists()  # checkpoints are dropped once the run completes
    # --resume on a finished run is refused with a clear message
    assert main([*args, "--resume", str(out)]) == 2
    assert "already finished" in capsys.readouterr().err


# Bad inputs exit 2 with one line: the table in tests/test_cli_errors.py.


def test_existing_output_dir_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli("quantize", "--model", "resnet20", "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_interrupted_cli_run_resumes_to_identical_weights(tmp_path, small_teacher):
    """Ctrl-C after the first checkpoint, then --resume: same student as an uninterrupted run."""
    import signal
    import time

    from safetensors.torch import load_file

    # enough epochs that the run is still going when the first checkpoint is seen
    args = [*tiny_distill_args(small_teacher, epochs=40), "--seed", "3"]
    assert run_cli(*args, "--out", tmp_path / "full").returncode == 0

    out = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zsq", *map(str, args), "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background jobs inherit SIGINT ignored; the user's Ctrl-C is what we test
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = tmp_path / "cut.partial" / "checkpoint" / "last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, proc.stderr.read()
    assert checkpoint.exists() and not out.exists()

    resumed = run_cli(*args, "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    full = load_file(tmp_path / "full" / "student.safetensors")
    cut = load_file(out / "student.safetensors")
    assert full.keys() == cut.keys()
    for key in full:
        assert torch.equal(full[key], cut[key]), key


def test_precision_flag_reaches_the_report_and_bad_values_exit_2(tmp_path, small_teacher):
    args = [*tiny_distill_args(small_teacher, epochs=2), "--precision", "bf16"]
    result = run_cli(*args, "--out", tmp_path / "bf16", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert report["execution"] == {"precision": "bf16", "compile": None}
    bad = run_cli(
        *tiny_distill_args(small_teacher, epochs=2), "--compile", "turbo", "--out", tmp_path / "bad"
    )
    assert bad.returncode == 2 and "--compile" in bad.stderr and not (tmp_path / "bad").exists()


def test_qimera_source_options_from_the_cli(tmp_path, small_teacher):
    args = [*tiny_distill_args(small_teacher, epochs=2)]
    args[args.index("gdfq")] = "qimera"
    opts = ["--source-opt", "mix_prob=1.0", "--source-opt", "num_mix=3"]
    result = run_cli(*args, *opts, "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["source_options"] == {"mix_prob": 1.0, "num_mix": 3}
    bad = run_cli(*args, "--source-opt", "mixprob=1", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "mix_prob" in bad.stderr  # names the options it takes
    assert not (tmp_path / "bad").exists()


def test_evaluating_during_training_leaves_the_student_unchanged(tmp_path, small_teacher):
    """--eval-data only measures: the same run with and without it writes the same bytes."""
    args = [*tiny_distill_args(small_teacher, epochs=3), "--set", "eval_every=1"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "measured"), "--eval-data", "digits"]) == 0
    measured = json.loads((tmp_path / "measured" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval_top1" in measured  # it did evaluate, every epoch
    plain = (tmp_path / "plain" / "student.safetensors").read_bytes()
    assert (tmp_path / "measured" / "student.safetensors").read_bytes() == plain
