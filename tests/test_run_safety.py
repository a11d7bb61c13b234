"""Runs a user can trust: --overwrite never deletes a user's files, --resume continues exactly or
refuses with one line, an interrupted or refused run leaves nothing behind, files follow the umask.

Every run is in-process (``zsq.cli.main``) on the demo's 1x8x8 digits CNN, a few seconds each.
"""

import json
import os
import shlex
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from zsq.cli import main
from zsq.demo import digits_cnn
from zsq.distill import Distiller
from zsq.errors import ZsqError
from zsq.io import read_verified, run_lock, users_entries, write_verified
from zsq.layout import RunLayout

SIDECAR = {"num_classes": 10, "in_channels": 1, "normalize_mean": [0.3], "normalize_std": [0.4]}
TINY_SETS = [
    "epochs=3",
    "iters_per_epoch=2",
    "batch_size=4",
    "gen_warmup_epochs=1",
    "act_calib_epochs=1",
    "probe_batch_size=8",
]


def write_teacher(folder, name="digits", seed=0):
    """A random digits CNN (the mechanics do not need accuracy) with its JSON sidecar."""
    torch.manual_seed(seed)
    weights = folder / f"{name}.safetensors"
    save_file(digits_cnn().state_dict(), weights)
    (folder / f"{name}.json").write_text(json.dumps(SIDECAR))
    return weights


def teacher_args(weights):
    return ["--model", "zsq.demo:digits_cnn", "--weights", str(weights), "--image-size", "8"]


def minmax_args(weights):
    return ["quantize", *teacher_args(weights), "--calib-size", "16", "--quiet", "--device", "cpu"]


def qimera_args(weights):
    """A Qimera+AIT run of three tiny epochs, with a source option: every kind of option."""
    sets = [arg for item in TINY_SETS for arg in ("--set", item)]
    return [
        "quantize",
        *teacher_args(weights),
        "--method",
        "qimera",
        "--ait",
        "--recipe",
        "demo",
        *sets,
        "--source-opt",
        "mix_prob=0.4",
        "--quiet",
        "--device",
        "cpu",
    ]


def error_line(capsys):
    """The one line a refused command printed (log lines aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("zsq:")]
    others = [line for line in err.splitlines() if line and not line.startswith(("zsq:", "WARN"))]
    assert len(lines) == 1 and not others, err
    return lines[0]


def interrupt_at_epoch(monkeypatch, epoch, stop=KeyboardInterrupt):
    """Make training stop at the start of ``epoch`` (0-based) as Ctrl-C would."""
    train_epoch = Distiller.train_epoch

    def stopping(self, e):
        if e == epoch:
            raise stop()
        return train_epoch(self, e)

    monkeypatch.setattr(Distiller, "train_epoch", stopping)


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def weights(tmp_path):
    return write_teacher(tmp_path)


# --- --overwrite and --out --------------------------------------------------------------------
def test_overwrite_never_deletes_a_users_file(tmp_path, weights, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main([*minmax_args(weights), "--out", str(mine), "--overwrite"]) == 2
    assert "not a zsq run" in error_line(capsys)
    assert (mine / "notes.txt").read_text() == "my notes" and tree(mine) == ["notes.txt"]
    assert not (tmp_path / "mine.partial").exists()


def test_overwrite_replaces_an_empty_folder_and_a_previous_run(tmp_path, weights, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main([*minmax_args(weights), "--out", str(out)]) == 2  # exists: needs --overwrite
    assert "--overwrite" in error_line(capsys)
    assert main([*minmax_args(weights), "--out", str(out), "--overwrite"]) == 0
    assert (out / "student.safetensors").exists() and (out / ".zsq-run").exists()
    first = load_file(out / "student.safetensors")
    assert main([*minmax_args(weights), "--out", str(out), "--overwrite", "--wbits", "8"]) == 0
    second = load_file(out / "student.safetensors")
    assert json.loads((out / "report.json").read_text())["wbits"] == 8
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits.json",
        "digits.safetensors",
        "out",
    ]


def test_overwrite_keeps_a_run_folder_that_holds_the_users_files(tmp_path, weights, capsys):
    """A teacher copied into a finished run (and read from there), notes beside it: the folder
    is not replaced, with --overwrite or --resume, and the run's own files count as its own."""
    out = tmp_path / "out"
    assert main([*minmax_args(weights), "--out", str(out)]) == 0
    assert users_entries(out) == []
    (out / "teacher.safetensors").write_bytes(weights.read_bytes())
    (out / "teacher.json").write_text(json.dumps(SIDECAR))
    (out / "NOTES.md").write_text("mine")
    before = tree(out)
    again = _replace(minmax_args(weights), str(weights), str(out / "teacher.safetensors"))
    assert main([*again, "--out", str(out), "--overwrite"]) == 2
    line = error_line(capsys)
    assert "NOTES.md, teacher.json, teacher.safetensors" in line and "move them out" in line
    assert tree(out) == before and not (tmp_path / "out.partial").exists()


def test_a_generator_runs_folder_holds_only_what_zsq_writes(tmp_path, weights):
    out = tmp_path / "q"
    assert main([*qimera_args(weights), "--out", str(out)]) == 0
    assert users_entries(out) == []


@pytest.mark.parametrize("how", ["--out", "--overwrite", "--resume"])
def test_a_folder_another_run_is_writing_is_refused(stopped_run, capsys, how):
    """While a process holds the run's lock (here this test, as a live run would), a second
    run may neither start, overwrite nor resume there."""
    weights, out = stopped_run
    before = tree(out.parent)
    target = ["--resume", str(out)] if how == "--resume" else ["--out", str(out)]
    extra = ["--overwrite"] if how == "--overwrite" else []
    with run_lock(out):
        assert main([*qimera_args(weights), *target, *extra]) == 2
    assert "is in use by another zsq run (process" in error_line(capsys)
    assert tree(out.parent) == before


def test_out_dot_and_out_file_are_one_line_errors(tmp_path, weights, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main([*minmax_args(weights), "--out", ".", *extra]) == 2
        assert "not a zsq run" in error_line(capsys)
        assert main([*minmax_args(weights), "--out", "digits.json", *extra]) == 2
        assert "is a file" in error_line(capsys)
        assert main([*minmax_args(weights), "--out", "/", *extra]) == 2
        assert "cannot use / as the output folder" in error_line(capsys)
    assert tree(tmp_path) == before


def test_a_refused_run_leaves_no_parent_folders(tmp_path, weights, capsys):
    out = tmp_path / "runs" / "deep" / "q"
    bad_option = ["--source-opt", "mixprob=1"]  # refused by the source, after the folder exists
    assert main([*qimera_args(weights), *bad_option, "--out", str(out)]) == 2
    assert "mix_prob" in error_line(capsys)
    assert not (tmp_path / "runs").exists()


# --- interruption -----------------------------------------------------------------------------
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_interruption_before_the_first_checkpoint_leaves_nothing(
    tmp_path, weights, capsys, monkeypatch, stop
):
    if stop == "ctrl-c":
        interrupt_at_epoch(monkeypatch, 0)
        code = 130
    else:
        train_epoch = Distiller.train_epoch

        def terminated(self, epoch):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler turns it into an exception
            return train_epoch(self, epoch)

        monkeypatch.setattr(Distiller, "train_epoch", terminated)
        code = 143
    out = tmp_path / "runs" / "q"
    assert main([*qimera_args(weights), "--out", str(out)]) == code
    assert "before the first checkpoint" in error_line(capsys)
    assert not (tmp_path / "runs").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_interrupted_message_gives_the_command_that_resumes_exactly(
    tmp_path, weights, capsys, monkeypatch
):
    args = [*qimera_args(weights), "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 2)
        assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    line = error_line(capsys)
    prefix = "zsq: interrupted; continue with: "
    assert line.startswith(prefix), line
    command = shlex.split(line[len(prefix) :])
    assert command == ["zsq", *args, "--resume", str(tmp_path / "cut")]
    assert main(command[1:]) == 0
    full = load_file(tmp_path / "full" / "student.safetensors")
    cut = load_file(tmp_path / "cut" / "student.safetensors")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert len(report["sessions"]) == 2 and report["seconds"] == round(sum(report["sessions"]), 2)
    assert not (tmp_path / "cut.partial").exists()


def test_a_stopped_run_without_checkpoint_gets_the_same_advice_both_ways(tmp_path, weights, capsys):
    out = tmp_path / "q"
    stale = tmp_path / "q.partial"  # what kill -9 before the first checkpoint leaves
    stale.mkdir()
    (stale / ".zsq-run").write_text(json.dumps({"zsq_run": 1, "options": {}, "sessions": []}))
    assert main([*qimera_args(weights), "--out", str(out)]) == 2
    assert "--overwrite" in error_line(capsys) and stale.exists()
    assert main([*qimera_args(weights), "--resume", str(out)]) == 2
    line = error_line(capsys)
    assert "no checkpoint" in line and f"--out {out} --overwrite" in line
    assert main([*minmax_args(weights), "--out", str(out), "--overwrite"]) == 0
    assert not stale.exists() and (out / "report.json").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, weights, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert main([*qimera_args(weights), "--resume", str(mine)]) == 2
    line = error_line(capsys)
    assert "already finished" not in line and "not a zsq run" in line
    assert main([*qimera_args(weights), "--resume", str(tmp_path / "nothing")]) == 2
    assert "no unfinished run" in error_line(capsys)
    assert tree(tmp_path) == ["digits.json", "digits.safetensors", "mine", "mine/notes.txt"]


# --- --resume refuses what it cannot continue exactly -----------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A Qimera run stopped after its first checkpoint; refused resumes must leave it intact."""
    folder = tmp_path_factory.mktemp("stopped")
    weights = write_teacher(folder)
    write_teacher(folder, name="other", seed=1)
    out = folder / "run"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at_epoch(patch, 1)
        assert main([*qimera_args(weights), "--out", str(out)]) == 130
    return weights, out


def _replace(args, old, new):
    args = list(args)
    args[args.index(old)] = new
    return args


CHANGES = {
    "--wbits": lambda a: [*a, "--wbits", "3"],
    "--abits": lambda a: [*a, "--abits", "8"],
    "--method": lambda a: [  # gdfq takes no mix_prob: the source option goes too
        x for x in _replace(a, "qimera", "gdfq") if x not in ("--source-opt", "mix_prob=0.4")
    ],
    "--seed": lambda a: [*a, "--seed", "7"],
    "--set epochs": lambda a: _replace(a, "epochs=3", "epochs=4"),
    "--layer": lambda a: [*a, "--layer", "0=8"],
    "--act-placement": lambda a: [*a, "--act-placement", "input"],
    "--source-opt mix_prob": lambda a: _replace(a, "mix_prob=0.4", "mix_prob=0.5"),
    "--ait": lambda a: [x for x in a if x != "--ait"],
    "--weights (sha256)": lambda a: _replace(
        a, a[a.index("--weights") + 1], a[a.index("--weights") + 1].replace("digits", "other")
    ),
}


@pytest.mark.parametrize("option", sorted(CHANGES))
def test_resume_with_a_changed_option_is_refused_naming_it(stopped_run, capsys, option):
    weights, out = stopped_run
    before = (out.parent / "run.partial" / "checkpoint" / "last.pt").read_bytes()
    args = CHANGES[option](qimera_args(weights))
    assert main([*args, "--resume", str(out)]) == 2
    line = error_line(capsys)
    assert "cannot resume" in line and f"{option} " in line, line
    # only what changed is named (the method's change drops its source option too)
    assert line.count(" -> ") == 1 or option in ("--ait", "--method"), line
    assert (out.parent / "run.partial" / "checkpoint" / "last.pt").read_bytes() == before


def test_resume_of_the_working_folder_or_without_options_says_what_to_give(stopped_run, capsys):
    weights, out = stopped_run
    work = out.parent / "run.partial"
    assert main([*qimera_args(weights), "--resume", str(work)]) == 2
    line = error_line(capsys)
    assert "working folder of the unfinished run" in line and f"--resume {out}" in line, line
    assert main(["quantize", "--resume", str(out)]) == 2
    assert "needs every option the run started with" in error_line(capsys)
    assert RunLayout(work).checkpoint.exists()


def test_resume_with_a_damaged_checkpoint_is_refused(stopped_run, capsys):
    weights, out = stopped_run
    checkpoint = out.parent / "run.partial" / "checkpoint" / "last.pt"
    data = bytearray(checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(b ^ 0xFF for b in data[middle : middle + 2000])
    original = checkpoint.read_bytes()
    checkpoint.write_bytes(bytes(data))
    try:
        assert main([*qimera_args(weights), "--resume", str(out)]) == 2
        line = error_line(capsys)
        assert "damaged" in line and "--overwrite" in line, line
        assert checkpoint.read_bytes() == bytes(data)  # kept for the user to inspect
    finally:
        checkpoint.write_bytes(original)


def test_resume_with_only_speed_options_changed_is_accepted(tmp_path, weights, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 1)
        assert main([*qimera_args(weights), "--out", str(out)]) == 130
    args = _replace(qimera_args(weights), "cpu", "auto")  # the device
    args = [a for a in args if a != "--quiet"]
    assert main([*args, "--precision", "tf32", "--resume", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["epochs_run"] == 3 and len(report["sessions"]) == 2


def _trainer_on(folder, teacher, method, spec):
    """A trainer of ``method`` over the checkpoint in ``folder`` (the run record bypassed)."""
    from zsq.quant import QuantSpec, quantize_model
    from zsq.synth import build_source

    student = quantize_model(teacher, QuantSpec(**spec), (1, 8, 8))
    source = build_source(
        method.SOURCE, teacher, num_classes=10, image_shape=(1, 8, 8), **method.source_options
    )
    device = torch.device("cpu")
    return Distiller(teacher, student, source, method.resolved, device=device, work_dir=folder)


def test_resume_with_another_recipe_on_the_api_path_is_still_refused(stopped_run):
    """The run record refuses first (``zsq.quantize``); the trainer's own check backs it up."""
    import zsq

    _, out = stopped_run
    teacher = digits_cnn().eval()
    method = zsq.Qimera(recipe="demo", overrides={"epochs": 5})
    with pytest.raises(ZsqError, match="cannot resume .*method.recipe.epochs 3 -> 5"):
        zsq.quantize(
            teacher, method, image_shape=(1, 8, 8), num_classes=10, device="cpu", work_dir=out,
            resume=True, progress=False,
        )  # fmt: skip
    trainer = _trainer_on(out.parent / "run.partial", teacher, method, {})
    with pytest.raises(ZsqError, match="different recipe|does not fit"):
        trainer.resume()


@pytest.mark.parametrize(("bits", "match"), [({"wbits": 2}, "'0'"), ({"abits": 8}, "act_quant")])
def test_resume_with_other_bits_on_the_api_path_is_refused(stopped_run, bits, match):
    """The state dict holds no bit width: the checkpoint records the quantizers' settings."""
    import zsq
    from zsq.recipes import parse_overrides

    weights, out = stopped_run
    teacher = digits_cnn().eval()
    teacher.load_state_dict(load_file(weights))
    checkpoint = out.parent / "run.partial" / "checkpoint" / "last.pt"
    before = checkpoint.read_bytes()
    options = {"wbits": 4, "abits": 4, **bits}
    method = zsq.Qimera(
        ait=True, recipe="demo", overrides=parse_overrides(TINY_SETS),
        source_options={"mix_prob": 0.4},
    )  # fmt: skip
    with pytest.raises(ZsqError, match="cannot resume .*quant"):
        zsq.quantize(
            teacher, method, image_shape=(1, 8, 8), num_classes=10, quant=zsq.QuantSpec(**options),
            device="cpu", work_dir=out, resume=True, progress=False,
        )  # fmt: skip
    trainer = _trainer_on(out.parent / "run.partial", teacher, method, options)
    with pytest.raises(ZsqError, match=f"other quantizer settings .*{match}"):
        trainer.resume()
    assert checkpoint.read_bytes() == before


# --- files ------------------------------------------------------------------------------------
def test_eval_with_synthetic_calibration_writes_nothing(tmp_path, weights, monkeypatch, capsys):
    """zsq eval makes its calibration images in memory: no cache in the working folder."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["eval", *teacher_args(weights), "--data", "digits", "--limit", "16", "--wbits", "4"]
    assert main([*args, "--abits", "4", "--calib", "gdfq", "--calib-size", "8", "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert tree(work) == []


def test_verified_file_survives_a_crash_between_its_two_renames(tmp_path):
    path = tmp_path / "last.pt"
    write_verified(path, b"first")
    digest_file = tmp_path / "last.pt.sha256"
    assert digest_file.read_text().split()[1] == "last.pt"
    first_digest = digest_file.read_text()
    write_verified(path, b"second")
    assert read_verified(path) == b"second"
    # a crash after the digest file was rewritten, before the checkpoint was: both verify
    import hashlib

    both = hashlib.sha256(b"second").hexdigest() + "  last.pt\n" + first_digest
    digest_file.write_text(both)
    path.write_bytes(b"first")
    assert read_verified(path) == b"first"
    path.write_bytes(b"other")
    with pytest.raises(ZsqError, match="damaged"):
        read_verified(path)
    digest_file.unlink()
    with pytest.raises(ZsqError, match="no digest"):
        read_verified(path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_files_follow_the_umask(tmp_path, weights, umask):
    previous = os.umask(umask)
    try:
        assert main([*minmax_args(weights), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "out").iterdir() if p.is_file()]
    assert len(files) >= 4
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_an_option_newer_than_the_run_does_not_block_its_resume_while_unset():
    from zsq.run.record import differences

    saved = {"method": "gdfq", "seed": 0}
    assert differences(saved, {**saved, "method.init": None}) == []
    assert differences(saved, {**saved, "method.init": "lapq"}) == ["method.init (unset) -> lapq"]


def test_the_lock_is_on_the_real_folder_whatever_its_spelling(stopped_run, tmp_path, capsys):
    """A symlinked parent and another temp folder meet the same lock; it leaves no file."""
    import tempfile

    weights, out = stopped_run
    link = tmp_path / "link"
    link.symlink_to(out.parent, target_is_directory=True)
    with run_lock(out):
        old = tempfile.tempdir
        tempfile.tempdir = str(tmp_path)  # another TMPDIR: the lock does not live there
        try:
            code = main([*qimera_args(weights), "--out", str(link / out.name), "--overwrite"])
        finally:
            tempfile.tempdir = old
        assert code == 2
        assert "is in use by another zsq run (process" in error_line(capsys)
        assert (out.parent / f".{out.name}.zsq-lock").exists()
    assert not (out.parent / f".{out.name}.zsq-lock").exists()  # removed when the run ends
    assert (out.parent / f"{out.name}.partial" / "checkpoint").is_dir()  # the run's work kept


def test_partial_names_are_reserved_and_a_finished_run_is_never_called_unfinished(
    tmp_path, weights, capsys
):
    assert main([*minmax_args(weights), "--out", str(tmp_path / "mm.partial")]) == 2
    assert "are zsq's unfinished runs" in error_line(capsys)
    assert not (tmp_path / "mm.partial").exists()
    assert main([*minmax_args(weights), "--out", str(tmp_path / "done")]) == 0
    (tmp_path / "done").rename(tmp_path / "mm.partial")  # as an older zsq let a user name it
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main([*minmax_args(weights), "--out", str(tmp_path / "mm"), *extra]) == 2
        assert "holds a finished run named like an unfinished one" in error_line(capsys)
    assert tree(tmp_path) == before


def test_overwrite_with_a_resume_that_replaces_nothing_is_refused(stopped_run, capsys):
    weights, out = stopped_run
    before = tree(out.parent)
    assert main([*qimera_args(weights), "--resume", str(out), "--overwrite"]) == 2
    assert "--overwrite has no effect when resuming" in error_line(capsys)
    assert tree(out.parent) == before


@pytest.fixture
def full_disk(tmp_path):
    """A 32 kB tmpfs (needs root and mount; skipped elsewhere)."""
    import subprocess

    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(full_disk, weights, tmp_path, capsys):
    assert main([*minmax_args(weights), "--out", str(full_disk / "run")]) == 2
    assert "No space left on device" in error_line(capsys)
    assert list(full_disk.iterdir()) == []
    assert main([*minmax_args(weights), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    onnx = ["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(full_disk / "x.onnx")]
    assert main(onnx) == 2
    assert "No space left on device" in error_line(capsys)
    assert list(full_disk.iterdir()) == []


def test_a_mount_point_to_overwrite_is_refused_before_the_work(full_disk, weights, capsys):
    assert main([*minmax_args(weights), "--out", str(full_disk), "--overwrite"]) == 2
    assert "is a mount point" in error_line(capsys)
    assert not full_disk.with_name("full.partial").exists()


def test_weights_under_a_folder_name_that_is_not_utf8(tmp_path, weights, capsys):
    import shutil

    folder = tmp_path / os.fsdecode(b"w\xff")
    folder.mkdir()
    for file in weights.parent.iterdir():
        if file.name.startswith(weights.stem):
            shutil.copy(file, folder / file.name)
    args = [a if a != str(weights) else str(folder / weights.name) for a in minmax_args(weights)]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.fixture
def immutable_run(tmp_path, weights):
    """A finished run whose folder is immutable (``chattr +i``; needs root and ext4-like
    attributes, skipped elsewhere): it can be neither renamed nor written into."""
    import subprocess

    out = tmp_path / "imm"
    assert main([*minmax_args(weights), "--out", str(out)]) == 0
    done = subprocess.run(["chattr", "+i", str(out)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot make a folder immutable here (needs root and chattr)")
    yield out
    subprocess.run(["chattr", "-i", str(out)], check=False)


def test_an_immutable_folder_to_overwrite_is_refused_before_the_work(
    immutable_run, weights, capsys
):
    capsys.readouterr()
    before = tree(immutable_run.parent)
    argv = [*qimera_args(weights), "--out", str(immutable_run), "--overwrite"]
    assert main(argv) == 2
    assert "cannot be replaced (Operation not permitted)" in error_line(capsys)
    assert tree(immutable_run.parent) == before  # no imm.partial, nothing moved aside
