"""torch.distributed: two real gloo processes on CPU give the single-process run, bit for bit
where the ranks must agree; a rank that dies ends the run, which then resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests._ddp_worker import GLOBAL_BATCH, eval_set, gradient_case, spawn
from tests._teachers import tiny_teacher

from zsq import distributed
from zsq.errors import ZsqError
from zsq.evaluate import evaluate
from zsq.io import partial_dir
from zsq.layout import RunLayout

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return spawn("train", tmp_path_factory.mktemp("train"))


def test_ranks_end_with_bitwise_equal_student_and_generator(trained):
    first, second = trained
    assert first["local_batch"] == second["local_batch"] == GLOBAL_BATCH // 2
    for key in ("student", "source"):
        assert first[key].keys() == second[key].keys()
        for name, tensor in first[key].items():
            assert torch.equal(tensor, second[key][name]), f"{key} {name} differs across ranks"
    # ... although each rank drew its own samples (its own RNG stream)
    assert not torch.equal(first["probe"], second["probe"])


def test_kappas_and_crossings_agree_across_ranks(trained):
    first, second = (result["history"] for result in trained)
    student_epochs = [m for m in first if "kappa" in m]
    assert student_epochs, "GI never ran"
    for a, b in zip(first, second, strict=True):
        assert a.get("kappa") == b.get("kappa")
        assert a.get("crossing_fraction") == b.get("crossing_fraction")


def test_sharded_evaluation_equals_one_process(trained):
    """Both ranks report the top-1 of the whole evaluation set, the single-process figure."""
    for result in trained:
        assert result["eval_sharded"] == result["eval_whole"]
    student = _student_from(trained[0]["student"])
    single = evaluate(student, eval_set(), progress=False).top1
    for result in trained:
        assert result["history"][-1]["eval_top1"] == pytest.approx(single, abs=0)


def _student_from(state):
    from zsq.quant import QuantSpec, quantize_model, set_observing

    student = quantize_model(tiny_teacher(), QuantSpec(wbits=4, abits=4), (3, 8, 8))
    student.load_state_dict(state)
    set_observing(student, False)
    return student


def test_all_reduced_gradients_equal_the_single_process_gradients(tmp_path):
    """Each rank sees half of one batch; after the all-reduce the student's and the generator's
    gradients (global BatchNorm and BNS statistics included) and the activation ranges are those
    of one process on the whole batch."""
    ranks = spawn("gradients", tmp_path)
    single = gradient_case(rank=0, world_size=1)
    for result in ranks:
        for part in ("student", "generator"):
            for name, grad in single[part].items():
                torch.testing.assert_close(result[part][name], grad, rtol=1e-4, atol=1e-6)
        for name, value in single["ranges"].items():
            assert torch.equal(result["ranges"][name], value), name
    assert any(g.abs().sum() > 0 for g in single["generator"].values())


@pytest.fixture
def vit_teacher_file():
    pytest.importorskip("timm")
    from zsq.paths import shared_data_dir

    path = shared_data_dir() / "weights" / "vit_fashionmnist.safetensors"
    if not path.is_file():
        pytest.skip(f"ViT teacher not found under {shared_data_dir()}")
    return path


def test_vit_pool_is_split_over_the_ranks_and_the_same_on_each(tmp_path, vit_teacher_file):
    """Each rank makes every second batch from its own stream; the gathered pool is identical
    on both, and its batches are the ranks' own (rank 0's first image is not rank 1's)."""
    ranks = spawn("vit_pool", tmp_path)
    assert torch.equal(ranks[0]["images"], ranks[1]["images"])
    assert torch.equal(ranks[0]["labels"], ranks[1]["labels"])
    images = ranks[0]["images"]
    assert images.shape == (4, 1, 28, 28) and not torch.equal(images[0], images[1])


def test_vit_distillation_ends_bitwise_equal_on_the_ranks(tmp_path, vit_teacher_file):
    ranks = spawn("vit_train", tmp_path)
    for key, value in ranks[0]["student"].items():
        assert torch.equal(value, ranks[1]["student"][key]), key
    last = [r["history"][-1] for r in ranks]
    assert last[0]["kappa"] == last[1]["kappa"] and len(last[0]["kappa"]) == 18


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux thread names")
def test_shutdown_joins_gloo_threads_even_after_torch_distributed_nn_is_imported(tmp_path):
    """Imported after the group exists, torch.distributed.nn keeps it alive past
    destroy_process_group; its gloo threads then free tensors during interpreter exit and abort
    the process about one run in thirty. zsq imports it first, so shutdown joins them."""
    ranks = spawn("teardown", tmp_path)
    assert [r["gloo_threads_left"] for r in ranks] == [0, 0]


def test_local_batch_must_split_evenly():
    world = distributed.World(rank=0, size=3)
    assert distributed.local_batch_size(12, world) == 4
    with pytest.raises(ZsqError, match="multiple of 3"):
        distributed.local_batch_size(200, world)


def test_rank_seeds_differ_and_are_stable():
    seeds = [distributed.rank_seed(0, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [distributed.rank_seed(0, r) for r in range(4)]


# --- torchrun end to end --------------------------------------------------------------------
def _torchrun(args, nproc=2, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "zsq", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSQ_DIST_TIMEOUT": "30"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs
    )


def _run_args(small_teacher, epochs):
    sets = [
        f"epochs={epochs}",
        "iters_per_epoch=20",
        "batch_size=8",
        "gen_warmup_epochs=1",
        "act_calib_epochs=1",
        "probe_batch_size=8",
    ]
    flags = [arg for item in sets for arg in ("--set", item)]
    return ["quantize", *small_teacher, "--method", "gdfq", "--ait", "--recipe", "demo", *flags]


def _worker_pid(parent: int, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker process with this RANK (Linux /proc)."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid")
            )
            if ppid == parent and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


def _first_checkpoint(launcher: subprocess.Popen, out: Path) -> tuple[Path, float]:
    """Wait (at most 120 s) for the launched run's first checkpoint; its path and the deadline."""
    checkpoint = RunLayout(partial_dir(out)).checkpoint
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    return checkpoint, deadline


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_killed_rank_ends_the_run_and_resume_completes_it(tmp_path, small_teacher):
    out = tmp_path / "run"
    args = [*_run_args(small_teacher, epochs=5), "--device", "cpu", "--quiet"]
    launcher = _torchrun([*args, "--out", out])
    checkpoint, deadline = _first_checkpoint(launcher, out)
    os.kill(_worker_pid(launcher.pid, 1, deadline), signal.SIGKILL)
    started = time.monotonic()
    _, err = launcher.communicate(timeout=90)
    assert launcher.returncode != 0, err[-2000:]
    assert time.monotonic() - started < 60  # ended, not hung until a long timeout
    assert checkpoint.exists() and not (out / "report.json").exists()

    one = subprocess.run(
        [sys.executable, "-m", "zsq", *args, "--resume", out], capture_output=True, text=True
    )
    assert one.returncode == 2 and "ran as 2 process" in one.stderr, one.stderr
    assert len(one.stderr.strip().splitlines()) == 1

    resumed = _torchrun([*args, "--resume", out, "--json"])
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    report = json.loads(stdout)
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["epochs_run"] == 5 and len(report["sessions"]) == 2

    whole = _torchrun([*args, "--out", tmp_path / "whole"])  # never interrupted
    assert whole.wait(timeout=300) == 0, whole.communicate()[1][-2000:]
    resumed_state = load_file(out / "student.safetensors")
    whole_state = load_file(tmp_path / "whole" / "student.safetensors")
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)


# --- zsq launch: torchrun's launcher, failing as zsq fails ------------------------------------
def _launch(args, nproc=2):
    command = [sys.executable, "-m", "zsq", "launch", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSQ_DIST_TIMEOUT": "30"}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "batch_size=eight"], "recipe field 'batch_size' takes a whole number"),
        (["--wbits", "4", "--wbits", "3"], "--wbits 4 and --wbits 3 contradict"),
        (["--eval-data", "npz:/nonexistent.npz"], "not found"),
    ],
)
def test_a_refusal_under_launch_is_one_line_and_no_launcher_traceback(
    tmp_path, small_teacher, extra, message
):
    args = [*_run_args(small_teacher, epochs=2), "--device", "cpu", "--quiet"]
    done = _launch([*args, *extra, "--out", tmp_path / "run"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("zsq: error: ") and message in lines[0], lines
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("run", ".run"))]


def test_launch_runs_a_distillation_over_two_processes(tmp_path, small_teacher):
    args = [*_run_args(small_teacher, epochs=2), "--device", "cpu", "--quiet", "--json"]
    done = _launch([*args, "--out", tmp_path / "run"])
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["world_size"] == 2 and report["epochs_run"] == 2
    for bad in (["--bogus-option"], ["--nproc-per-node", "two"]):  # argparse's; torchrun's
        refused = _launch([*bad, "quantize"])
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith("zsq: error: torchrun"), refused.stderr


def test_ctrl_c_of_launch_stops_the_processes_without_a_launcher_traceback(tmp_path, small_teacher):
    args = [*_run_args(small_teacher, epochs=1000), "--device", "cpu", "--quiet"]
    command = [sys.executable, "-m", "zsq", "launch", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSQ_DIST_TIMEOUT": "30"}
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [*command, *map(str, args), "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env
    )
    checkpoint, deadline = _first_checkpoint(launcher, out)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-2000:]
    assert checkpoint.exists()  # the run can be resumed, and the advice says how
    assert "continue with: zsq launch --nproc-per-node=2 quantize" in err, err[-2000:]


@pytest.mark.parametrize(
    ("rank", "local_rank", "error", "started", "says"),
    [
        ("0", "0", "config", False, True),
        ("1", "1", "config", True, False),  # a bad option: rank 0 says it
        ("1", "1", "input", False, False),  # the checks read the same files on one machine
        ("8", "0", "input", False, True),  # another machine may lack them
        ("1", "1", "input", True, True),  # once the work runs: its own share
    ],
)
def test_which_process_says_an_error(monkeypatch, rank, local_rank, error, started, says):
    from zsq import distributed
    from zsq.cli import says_error
    from zsq.errors import ConfigError, ZsqError

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    distributed.reset_work()
    if started:
        distributed.begin_work()
    try:
        err = ConfigError("bad option") if error == "config" else ZsqError("no such file")
        assert says_error(err) is says
    finally:
        distributed.reset_work()
