"""No lost work (issue 23): every case of data loss, silent error and traceback the issue lists,
in one table through the CLI (``zsq.cli.main``, in-process), and a real live run met by a second
process through a symlink and through another ``TMPDIR``.

Each case must end with exit status 2, exactly one ``zsq: error:`` line on stderr, no traceback,
nothing written to stdout, and every file under the test's folder byte for byte as it was (the
sha256 of each file and the list of paths, before and after). Cases that need a machine's
privileges (a full disk on a small tmpfs, a mount point, an immutable folder) are in
``tests/test_run_safety.py`` and skip where the test cannot mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tests._cli import exit_code

from zsq.cli import main
from zsq.demo import digits_cnn

SIDECAR = {"num_classes": 10, "in_channels": 1, "normalize_mean": [0.3], "normalize_std": [0.4]}


def teacher(weights: str = "{tmp}/digits.safetensors") -> list[str]:
    return ["--model", "zsq.demo:digits_cnn", "--weights", weights, "--image-size", "8"]


RUN = ["--device", "cpu", "--quiet"]
GDFQ = ["--method", "gdfq", "--recipe", "demo"]
TINY = [f"--set={item}" for item in ("epochs=2", "iters_per_epoch=2", "batch_size=4")]
TINY += ["--set=gen_warmup_epochs=1", "--set=act_calib_epochs=1", "--set=probe_batch_size=8"]


def quantize(*extra: str, weights: str = "{tmp}/digits.safetensors") -> list[str]:
    return ["quantize", *teacher(weights), "--calib-size", "16", *RUN, *extra]


def evaluate(data: str, weights: str = "{tmp}/digits.safetensors") -> list[str]:
    return ["eval", *teacher(weights), "--data", data, *RUN]


CASES: dict[str, tuple[list[str], str]] = {
    # --- 1. data loss --------------------------------------------------------------------------
    "--out named like an unfinished run": (
        quantize("--out", "{tmp}/new.partial"),
        "are zsq's unfinished runs",
    ),
    "a finished run in a .partial folder is not replaced": (
        quantize("--out", "{tmp}/old", "--overwrite"),
        "holds a finished run named like an unfinished one",
    ),
    "analyze into a folder of the user's files": (
        ["analyze", "run", "{tmp}/run", "--out", "{tmp}/mine"],
        "holds files zsq did not write (notes.txt)",
    ),
    "export of a run whose student was damaged": (
        ["export", "{tmp}/damaged", "--format", "int", "--quiet"],
        "student.safetensors is not the file the run wrote",
    ),
    "analyze of a run whose student was damaged": (
        ["analyze", "run", "{tmp}/damaged", "--out", "{tmp}/an"],
        "student.safetensors is not the file the run wrote",
    ),
    "eval-export of an export whose tensors were damaged": (
        ["eval-export", "{tmp}/flipped.safetensors", "--data", "digits", "--quiet"],
        "do not match the sha256",
    ),
    # --- 2. silently wrong ---------------------------------------------------------------------
    "eval of weights holding NaN": (
        evaluate("digits", weights="{tmp}/nan.safetensors"),
        "holds 1 NaN or infinite",
    ),
    "quantize of weights holding NaN": (
        quantize("--out", "{tmp}/new", weights="{tmp}/nan.safetensors"),
        "holds 1 NaN or infinite",
    ),
    "weights that no longer match their sidecar's sha256": (
        evaluate("digits", weights="{tmp}/stale.safetensors"),
        "does not match the sha256 its sidecar",
    ),
    "a flag and its opposite": (
        quantize(*GDFQ, "--gi", "--no-gi", "--out", "{tmp}/new"),
        "--gi and --no-gi contradict each other",
    ),
    "--resume with --overwrite": (
        ["quantize", *teacher(), *RUN, *GDFQ, *TINY, "--resume", "{tmp}/stopped", "--overwrite"],
        "--overwrite has no effect when resuming",
    ),
    "compare a run with itself": (
        ["analyze", "compare", "{tmp}/run", "{tmp}/run", "--out", "{tmp}/cmp"],
        "run is given twice; compare different runs",
    ),
    "compare runs of different teachers": (
        ["analyze", "compare", "{tmp}/run", "{tmp}/other", "--out", "{tmp}/cmp"],
        "quantize different teachers",
    ),
    # --- 3. tracebacks -------------------------------------------------------------------------
    "npz labels of shape (N, 2)": (evaluate("npz:{tmp}/labels2.npz"), "shape (4, 2)"),
    "an .npy renamed .npz": (evaluate("npz:{tmp}/one.npz"), "holds one array"),
    "an npz of object arrays": (evaluate("npz:{tmp}/obj.npz"), "Object arrays"),
    "a truncated npz": (evaluate("npz:{tmp}/trunc.npz"), "cannot read"),
    "a decompression bomb in an image folder": (
        evaluate("imagefolder:{tmp}/bomb"),
        "too large to read safely",
    ),
    "export of a run with a truncated report.json": (
        ["export", "{tmp}/truncated", "--format", "int", "--quiet"],
        "report.json is not the file the run wrote",
    ),
    "--bits-from a bits.json that is not UTF-8": (
        quantize("--bits-from", "{tmp}/latin1-bits.json", "--out", "{tmp}/new"),
        "is not a zsq bits.json ('utf-8' codec can't decode",
    ),
    "a seed beyond 64 bits": (
        quantize("--seed", "99999999999999999999", "--out", "{tmp}/new"),
        "--seed must be a whole number in 0..",
    ),
    "an --out name of 300 characters": (
        quantize("--out", "{tmp}/" + "x" * 300),
        "(File name too long)",
    ),
}


def _write_inputs(tmp: Path) -> None:
    """The teachers, two finished runs and the damaged files the cases name."""
    torch.manual_seed(0)
    for name, seed in (("digits", 0), ("other", 1), ("nan", 0), ("stale", 0)):
        torch.manual_seed(seed)
        state = digits_cnn().state_dict()
        if name == "nan":
            next(v for k, v in state.items() if k.endswith("weight")).view(-1)[0] = float("nan")
        save_file(state, tmp / f"{name}.safetensors")
        sidecar = dict(SIDECAR)
        if name == "stale":
            sidecar["sha256"] = "0" * 64
        (tmp / f"{name}.json").write_text(json.dumps(sidecar))
    for out, weights in (("run", "digits"), ("other", "other")):  # tiny distillations
        argv = ["quantize", *teacher(str(tmp / f"{weights}.safetensors")), *RUN, *GDFQ, *TINY]
        argv += ["--out", str(tmp / out)]
        assert main(argv) == 0
    _stopped_run(tmp / "stopped")
    shutil.copytree(tmp / "run", tmp / "old.partial")  # a finished run an older zsq let be named so
    for name in ("damaged", "truncated"):
        shutil.copytree(tmp / "run", tmp / name)
    student = tmp / "damaged" / "student.safetensors"
    data = bytearray(student.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    student.write_bytes(bytes(data))
    report = tmp / "truncated" / "report.json"
    report.write_text(report.read_text()[:40])
    export = tmp / "flipped.safetensors"
    assert (
        main(["export", str(tmp / "run"), "--format", "int", "--out", str(export), "--quiet"]) == 0
    )
    data = bytearray(export.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # inside the last tensor's bytes
    export.write_bytes(bytes(data))
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    gray = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp / "labels2.npz", x=gray, y=np.zeros((4, 2), np.int64))
    np.save(tmp / "one.npy", gray)
    (tmp / "one.npy").rename(tmp / "one.npz")
    np.savez(tmp / "obj.npz", x=np.array([gray, 1], dtype=object), y=np.arange(4))
    np.savez(tmp / "full.npz", x=gray, y=np.arange(4))
    whole = (tmp / "full.npz").read_bytes()
    (tmp / "trunc.npz").write_bytes(whole[: len(whole) // 2])
    from PIL import Image

    for label in "0123456789":
        (tmp / "bomb" / label).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp / "bomb" / label / "small.png")
    Image.new("L", (15000, 15000)).save(tmp / "bomb" / "0" / "big.png")
    (tmp / "latin1-bits.json").write_bytes('{"layers": {"é": 4}}'.encode("latin-1"))


def _stopped_run(out: Path) -> None:
    """A distillation stopped (as by Ctrl-C) after its first checkpoint: ``out.partial``."""
    from zsq.distill import Distiller

    train_epoch = Distiller.train_epoch

    def stopping(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Distiller, "train_epoch", stopping)
        argv = ["quantize", *teacher(str(out.parent / "digits.safetensors")), *RUN, *GDFQ, *TINY]
        assert main([*argv, "--out", str(out)]) != 0
    assert (out.parent / f"{out.name}.partial" / "checkpoint").is_dir()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lost-work")
    _write_inputs(tmp)
    return tmp


def hashes(folder: Path) -> dict[str, str | None]:
    """The sha256 of every file under ``folder`` (``None`` for a folder), by relative path."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        )
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", list(CASES))
def test_each_case_is_one_line_and_changes_nothing(case, inputs, capsys, monkeypatch):
    argv, expected = CASES[case]
    argv = [arg.replace("{tmp}", str(inputs)) for arg in argv]
    monkeypatch.chdir(inputs)
    before = hashes(inputs)
    code = exit_code(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("zsq: error: "), captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert hashes(inputs) == before  # nothing created, changed or removed


# --- a real live run, and a second process against it ----------------------------------------
def _zsq(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zsq", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_a_live_run_is_not_touched_by_a_second_run_through_a_symlink_or_another_tmpdir(tmp_path):
    weights = tmp_path / "digits.safetensors"
    save_file(digits_cnn().state_dict(), weights)
    (tmp_path / "digits.json").write_text(json.dumps(SIDECAR))
    runs = tmp_path / "runs"
    runs.mkdir()
    (tmp_path / "link").symlink_to(runs, target_is_directory=True)
    other_tmp = tmp_path / "othertmp"
    other_tmp.mkdir()
    long_gdfq = [
        *GDFQ,
        "--set",
        "epochs=100000",
        "--set",
        "iters_per_epoch=2",
        "--set",
        "batch_size=4",
    ]
    args = ["quantize", *teacher(str(weights)), *RUN, *long_gdfq]
    live = _zsq(*args, "--out", str(runs / "lk"))
    try:
        checkpoint = runs / "lk.partial" / "checkpoint" / "last.pt"
        _wait_for(checkpoint, live)
        for where, env in (
            (str(tmp_path / "link" / "lk"), None),
            (str(runs / "lk"), {"TMPDIR": str(other_tmp)}),
        ):
            second = _zsq(*args, "--out", where, "--overwrite", env=env)
            out, err = second.communicate(timeout=120)
            lines = err.strip().splitlines()
            assert second.returncode == 2, err
            assert len(lines) == 1 and "is in use by another zsq run (process" in lines[0], err
            assert checkpoint.exists() and (runs / "lk.partial" / ".zsq-run").exists()
            assert live.poll() is None  # the live run goes on
        assert sorted(p.name for p in runs.iterdir()) == [".lk.zsq-lock", "lk.partial"]
    finally:
        live.terminate()
        live.communicate(timeout=120)
    assert not (runs / ".lk.zsq-lock").exists()  # the lock file goes with the run
