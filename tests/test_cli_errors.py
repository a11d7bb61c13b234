"""Every bad input to the CLI: exit status 2, one line on stderr, nothing created or removed.

One table of cases run in-process through ``zsq.cli.main``: mismatched data (channels, labels,
class folders, size, empty files), limits and sizes out of range, options the chosen method
would silently ignore, override patterns that match nothing, bad types, and the errors the
older tests checked one by one. Each case must fail before any work starts.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests._cli import exit_code

TEACHER = "{tmp}/digits.safetensors"  # the demo's digits CNN: 1 channel, 10 classes, 8x8
SMALL = ["--model", "zsq.demo:digits_cnn", "--weights", TEACHER, "--image-size", "8"]
OUT = ["--out", "{tmp}/out"]
RUN = ["--device", "cpu", "--quiet"]
GDFQ = ["--method", "gdfq", "--recipe", "demo"]
FP_BUDGET = ["--budget", "wbits=3", "--layer", "0=off"]


def quantize(*extra):
    return ["quantize", *SMALL, *OUT, *RUN, *extra]


def sized(size):
    """``quantize()`` with another --image-size than SMALL's (a flag given twice is refused)."""
    return ["quantize", *SMALL[:-2], "--image-size", size, *OUT, *RUN]


def evaluate(*extra, data="npz:{tmp}/digits.npz"):
    return ["eval", *SMALL, "--data", data, *RUN, *extra]


CASES = {
    "a flag and its opposite": (quantize(*GDFQ, "--gi", "--no-gi"), "--gi and --no-gi contradict"),
    "one flag, two values": (quantize("--wbits", "4", "--wbits=3"), "--wbits 4 and --wbits 3"),
    "an abbreviated flag and its opposite": (
        quantize(*GDFQ, "--gi", "--no-g"),
        "--gi and --no-gi contradict",
    ),
    "an abbreviated flag, two values": (
        quantize("--wbits", "4", "--wb=3"),
        "--wbits 4 and --wbits 3",
    ),
    # --- teacher and output (the cases tests/test_cli.py checked one by one) -------------------
    "missing weights": (
        ["quantize", "--model", "resnet20", "--weights", "{tmp}/no.pt", *OUT, *RUN],
        "not found",
    ),
    "corrupt weights": (
        ["quantize", "--model", "resnet20", "--weights", "{tmp}/bad.pt", *OUT, *RUN],
        "bad.pt",
    ),
    "class count of the weights": (
        [
            "quantize",
            "--model",
            "resnet20",
            "--weights",
            "{tmp}/r20.pt",
            "--num-classes",
            "100",
            *OUT,
            *RUN,
        ],
        "num-classes",
    ),
    "unknown model": (["quantize", "--model", "resnet21", *OUT, *RUN], "unknown model"),
    "bits out of range": (
        quantize("--wbits", "9"),
        "bit width 9 is out of range; use 2..8 or 'off'",
    ),
    "bits not a number": (quantize("--abits", "four"), "not a number"),
    "missing eval data": (quantize("--eval-data", "npz:{tmp}/missing.npz"), "not found"),
    "unknown dataset kind": (evaluate(data="mnist:{tmp}"), "unknown dataset spec"),
    "unwritable output": (["quantize", *SMALL, "--out", "/proc/zsq-out", *RUN], "cannot write"),
    "existing output folder": (["quantize", *SMALL, "--out", "{tmp}/mine", *RUN], "already exists"),
    "bad compile mode": (quantize(*GDFQ, "--compile", "turbo"), "--compile"),
    "misspelt source option": (
        quantize("--method", "qimera", "--recipe", "demo", "--source-opt", "mixprob=1"),
        "mix_prob",
    ),
    "bad source option syntax": (quantize(*GDFQ, "--source-opt", "mix_prob"), "KEY=VALUE"),
    "unknown method": (quantize("--method", "bogus"), "invalid choice"),
    "unknown recipe": (quantize("--method", "gdfq", "--recipe", "fast"), "unknown recipe"),
    "size not a number": (sized("big"), "invalid int"),
    "missing --out and --resume": (["quantize", *SMALL, *RUN], "--out"),
    # --- data that does not fit the model (issue 9 item 4) ------------------------------------
    "eval: RGB data, gray model": (evaluate(data="npz:{tmp}/rgb.npz"), "channel"),
    "quantize: RGB eval data": (quantize("--eval-data", "npz:{tmp}/rgb.npz"), "channel"),
    "quantize: RGB calibration data": (quantize("--calib", "npz:{tmp}/rgb.npz"), "channel"),
    "eval: label 12 of 10 classes": (evaluate(data="npz:{tmp}/label12.npz"), "labels"),
    "eval: negative label": (evaluate(data="npz:{tmp}/negative.npz"), "labels"),
    "quantize: label out of range": (quantize("--eval-data", "npz:{tmp}/label12.npz"), "labels"),
    "eval: 3 class folders, 10 classes": (
        evaluate(data="imagefolder:{tmp}/three"),
        "class subfolders",
    ),
    "quantize: 3 class folders": (
        quantize("--eval-data", "imagefolder:{tmp}/three"),
        "class subfolders",
    ),
    "eval: empty npz": (evaluate(data="npz:{tmp}/empty.npz"), "no images"),
    "quantize: empty npz": (quantize("--eval-data", "npz:{tmp}/empty.npz"), "no images"),
    "eval: 16-px data, 8-px model": (evaluate(data="npz:{tmp}/size16.npz"), "--image-size 16"),
    "quantize: 16-px eval data": (quantize("--eval-data", "npz:{tmp}/size16.npz"), "16x16"),
    "eval: --limit 0": (evaluate("--limit", "0"), "--limit"),
    "eval: --limit -3": (evaluate("--limit", "-3"), "--limit"),
    "quantize: --eval-limit 0": (
        quantize("--eval-data", "digits", "--eval-limit", "0"),
        "--eval-limit",
    ),
    "quantize: --image-size 0": (sized("0"), "image size 0 is outside"),
    "eval: --image-size -1": (
        ["eval", *SMALL[:-2], "--image-size", "-1", "--data", "npz:{tmp}/digits.npz", *RUN],
        "image size -1 is outside",
    ),
    "quantize: --image-size 100000": (sized("100000"), "outside 1..4096"),
    "sidecar image_size 0": (
        [
            "eval",
            "--model",
            "zsq.demo:digits_cnn",
            "--weights",
            "{tmp}/badsize/digits.safetensors",
            "--data",
            "digits",
            *RUN,
        ],
        "image_size",
    ),
    "calibration size 0": (quantize("--calib-size", "0"), "--calib-size"),
    # --- options that would do nothing (issue 9 item 5) ---------------------------------------
    "minmax --ait": (quantize("--ait"), "--ait"),
    "minmax --set": (quantize("--set", "epochs=3"), "--set"),
    "minmax --source-opt": (quantize("--source-opt", "mix_prob=0.4"), "--source-opt"),
    "minmax --recipe": (quantize("--recipe", "short"), "--recipe"),
    "minmax --loss": (quantize("--loss", "kl"), "--loss"),
    "minmax --no-gi": (quantize("--no-gi"), "--gi"),
    "minmax --optimizer": (quantize("--optimizer", "adam"), "--optimizer"),
    "minmax --lr-mult": (quantize("--lr-mult", "100"), "--lr-mult"),
    "minmax --precision": (quantize("--precision", "bf16"), "--precision"),
    "minmax --compile": (quantize("--compile", "default"), "--compile"),
    "gdfq --calib-size": (quantize(*GDFQ, "--calib-size", "64"), "--calib-size"),
    "gdfq --calib": (quantize(*GDFQ, "--calib", "digits"), "--calib"),
    "--eval-limit without --eval-data": (quantize("--eval-limit", "5"), "--eval-data"),
    "quantize: --layer matching nothing": (quantize("--layer", "conv*=8"), "conv*"),
    "eval: --layer matching nothing": (evaluate("--layer", "linear=8"), "linear"),
    "eval: --calib on a full-precision model": (evaluate("--calib-size", "64"), "--calib-size"),
    "--trust-checkpoint without weights": (
        ["quantize", "--model", "resnet20", "--trust-checkpoint", *OUT, *RUN],
        "--trust-checkpoint",
    ),
    "--download without data": (quantize("--download"), "--download"),
    "--download of an npz": (evaluate("--download"), "--download"),
    # --- overrides with the wrong type (issue 9 item 6, the CLI side) -------------------------
    "--set batch_size=eight": (quantize(*GDFQ, "--set", "batch_size=eight"), "whole number"),
    "--set gi=maybe": (quantize(*GDFQ, "--set", "gi=maybe"), "true or false"),
    "--set unknown field": (quantize(*GDFQ, "--set", "epoch=3"), "unknown recipe field"),
    "--set out of range": (quantize(*GDFQ, "--set", "rho=2"), "rho"),
    # --- post-training methods and --init (issue 11) ---------------------------------------
    "lapq: --lapq-layers nonsense": (
        quantize("--method", "lapq", "--lapq-layers", "nonsense"),
        "invalid choice",
    ),
    "lapq: bad layer policy option": (
        quantize("--method", "lapq", "--lapq-opt", "layers=nonsense"),
        "layer policy",
    ),
    "lapq: bad option value": (
        quantize("--method", "lapq", "--lapq-opt", "maxiter=two"),
        "maxiter",
    ),
    "lapq: calibration data that does not exist": (
        quantize("--method", "lapq", "--calib", "npz:{tmp}/missing.npz"),
        "not found",
    ),
    "zeroq on a teacher without BatchNorm": (
        [
            "quantize",
            "--model",
            "_user_model:tiny",
            "--weights",
            "{tmp}/tiny.safetensors",
            "--image-size",
            "8",
            *OUT,
            *RUN,
            "--method",
            "zeroq",
        ],
        "BatchNorm",
    ),
    "zeroq with another --calib": (
        quantize("--method", "zeroq", "--calib", "gaussian"),
        "distilled",
    ),
    "--source-opt with gaussian calibration": (quantize("--source-opt", "steps=3"), "--source-opt"),
    "--init on a post-training method": (quantize("--init", "lapq"), "--init"),
    "--calib-opt on gdfq without --init": (
        quantize(*GDFQ, "--calib-opt", "steps=3"),
        "--calib-opt",
    ),
    "--calib-opt with gaussian calibration": (quantize("--calib-opt", "steps=3"), "--calib-opt"),
    "both --calib-opt and --source-opt on lapq": (
        quantize("--method", "lapq", "--calib-opt", "steps=3", "--source-opt", "lr=0.1"),
        "once",
    ),
    "--lapq-opt on gdfq without --init": (quantize(*GDFQ, "--lapq-opt", "maxiter=2"), "--lapq"),
    # --- the reconstruction line (genie) ----------------------------------------------------------
    "genie --loss": (
        quantize("--method", "genie", "--loss", "kl"),
        "--loss has no effect with --method genie (an option of gdfq",
    ),
    "a misspelt --calib source": (
        quantize("--method", "genie", "--calib", "geni"),
        "--calib 'geni' is neither a sample source",
    ),
    "genie: nothing quantized": (
        quantize("--method", "genie", "--convention", "all", "--wbits", "off", "--abits", "off"),
        "genie has nothing to quantize: --wbits and --abits are both off and no --layer sets",
    ),
    "lapq: nothing quantized, as a distillation's start": (
        quantize(*GDFQ, "--init", "lapq", "--wbits", "off", "--abits", "off"),
        "lapq has nothing to quantize",
    ),
    "lapq: nothing quantized but an allocation, which sets the widths": (
        quantize("--method", "lapq", "--wbits", "off", "--abits", "off", *FP_BUDGET),
        "per-layer overrides and a bit allocation",  # past the full-precision refusal
    ),
    "genie: fewer images than a reconstruction batch": (
        quantize("--method", "genie", "--recipe", "short", "--calib-size", "16"),
        "--calib-size 16 is fewer images than the reconstruction's batch of 32; raise "
        "--calib-size or lower batch_size in --set",
    ),
    "genie: the image count as a --calib-opt": (
        quantize("--method", "genie", "--calib-opt", "num_images=5"),
        "num_images is set by --calib-size",
    ),
    "genie: a folder as the image cache": (
        quantize("--method", "genie", "--calib-opt", "cache={tmp}"),
        "cache takes a file path (not a folder)",
    ),
    "genie: --method-opt overrides of another type": (
        quantize("--method", "genie", "--method-opt", "overrides=5"),
        "overrides must be a dict",
    ),
    "genie: --method-opt blocks=null": (
        quantize("--method", "genie", "--method-opt", "blocks=null"),
        "blocks must be a list of class names",
    ),
    "--init lapq: a genie option names --init": (
        quantize(*GDFQ, "--init", "lapq", "--convention", "all"),
        "--convention has no effect with --init lapq (an option of genie)",
    ),
    "--init genie: an unknown --init-opt": (
        quantize(*GDFQ, "--init", "genie", "--init-opt", "iterz=3"),
        "unknown reconstruction field(s) in --init-opt: iterz",
    ),
    "two flags set one field": (
        quantize(*GDFQ, "--init", "genie", "--convention", "all", "--init-opt", "convention=paper"),
        "--convention and --init-opt convention both set convention",
    ),
    "--recipe and --method-opt recipe": (
        quantize("--method", "genie", "--recipe", "short", "--method-opt", "recipe=paper"),
        "--recipe and --method-opt recipe both set recipe",
    ),
    "one --set key, two values": (
        quantize("--method", "genie", "--set", "iters=5", "--set", "iters=6"),
        "iters=5 and iters=6 contradict each other",
    ),
    "one recipe --set key, two values": (
        quantize(*GDFQ, "--set", "epochs=1", "--set", "epochs=2"),
        "recipe override epochs=1 and epochs=2 contradict each other",
    ),
    "--init genie: --init-opt overrides of another type": (
        quantize(*GDFQ, "--init", "genie", "--init-opt", "overrides=5"),
        "overrides must be a dict",
    ),
    # --- promises (issue 9 item 8): the cifar10 hint names a flag that exists -----------------
    "cifar10 folder missing": (evaluate(data="cifar10:{tmp}/absent"), "--download"),
}


def _write_inputs(tmp: Path) -> None:
    """The teacher, its variants and every small dataset the cases name."""
    from safetensors.torch import save_file

    from zsq.demo import digits_cnn
    from zsq.models import create_model

    torch.manual_seed(0)
    sidecar = {"num_classes": 10, "in_channels": 1, "normalize_mean": [0.3], "normalize_std": [0.4]}
    for folder, extra in ((tmp, {}), (tmp / "badsize", {"image_size": 0})):
        folder.mkdir(exist_ok=True)
        save_file(digits_cnn().state_dict(), folder / "digits.safetensors")
        (folder / "digits.json").write_text(json.dumps({**sidecar, **extra}))
    torch.save(create_model("resnet20").state_dict(), tmp / "r20.pt")
    save_file(
        create_model("_user_model:tiny", in_channels=1).state_dict(), tmp / "tiny.safetensors"
    )
    (tmp / "tiny.json").write_text(json.dumps(sidecar))
    (tmp / "bad.pt").write_bytes(b"\x00garbage" * 100)
    gray = np.zeros((4, 8, 8), np.uint8)
    labels = np.array([0, 1, 2, 3])
    np.savez(tmp / "digits.npz", x=gray, y=labels)
    np.savez(tmp / "rgb.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=labels)
    np.savez(tmp / "label12.npz", x=gray, y=np.array([0, 1, 12, 3]))
    np.savez(tmp / "negative.npz", x=gray, y=np.array([0, -1, 2, 3]))
    np.savez(tmp / "empty.npz", x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, np.int64))
    np.savez(tmp / "size16.npz", x=np.zeros((4, 16, 16), np.uint8), y=labels)
    for name in ("a", "b", "c"):
        (tmp / "three" / name).mkdir(parents=True)
        Image.new("L", (8, 8), 128).save(tmp / "three" / name / "0.png")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    _write_inputs(tmp)
    return tmp


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, inputs, capsys, monkeypatch):
    argv, expected = CASES[case]
    argv = [arg.replace("{tmp}", str(inputs)) for arg in argv]
    monkeypatch.chdir(inputs)
    before = _snapshot(inputs)
    code = exit_code(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("zsq: error: "), captured.err
    assert expected in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    assert _snapshot(inputs) == before  # nothing created, changed or removed


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
