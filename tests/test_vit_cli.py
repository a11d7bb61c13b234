"""The ViT teacher on the command line: a sidecar names the model; bad timm inputs exit 2."""

from __future__ import annotations

import json
import sys

import pytest

from zsq.cli import main

pytest.importorskip("timm")


@pytest.fixture
def vit(shared_data):
    return shared_data / "weights" / "vit_fashionmnist.safetensors"


def _quantize(out, *flags):
    return [
        "quantize",
        *flags,
        "--wbits",
        "8",
        "--abits",
        "8",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]


def test_sidecar_names_the_model_and_the_run_records_its_kwargs(tmp_path, vit, shared_data):
    data = f"fashion-mnist:{shared_data / 'fashion-mnist'}"
    out = tmp_path / "w8"
    args = _quantize(out, "--weights", str(vit), "--eval-data", data, "--eval-limit", "300")
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "timm:vit_tiny_patch16_224"
    assert report["student_top1"] > 80
    record = json.loads((out / ".zsq-run").read_text())
    assert record["options"]["--model-kwarg"]["embed_dim"] == 64


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "timm:not_a_model_at_all"], "unknown timm model"),
        (["--model-kwarg", "embed_dim=32"], "fix model_kwargs"),
    ],
)
def test_bad_timm_inputs_exit_2_with_one_line(tmp_path, vit, capsys, flags, message):
    out = tmp_path / "never"
    assert main(_quantize(out, "--weights", str(vit), *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_missing_timm_names_the_extra(tmp_path, vit, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails
    out = tmp_path / "never"
    assert main(_quantize(out, "--weights", str(vit))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zsq[vit]" in err[0], err
    assert not out.exists()
