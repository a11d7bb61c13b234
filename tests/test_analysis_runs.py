"""``zsq analyze``: a real run's logged numbers and plots, its Hessian, comparisons and errors.

Runs are made through the CLI on the demo's digits CNN (random init, 1x8x8 inputs): a GDFQ+AIT
run with the gradient cosines logged, a plain GDFQ run and a minmax run, once for the module.
"""

import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from zsq.analysis import measure_hessian, read_run_metrics, run_labels
from zsq.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def distill_args(teacher_args, *extra):
    """A 3-epoch generator run of a second or two (see tests/test_cli.py)."""
    sets = [
        "epochs=3",
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
        "--recipe",
        "demo",
        *[arg for item in sets for arg in ("--set", item)],
        *extra,
        "--quiet",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Folders of a GDFQ+AIT run (cosines logged), a GDFQ run and a minmax run."""
    from safetensors.torch import save_file

    from zsq.demo import digits_cnn

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    weights = root / "digits.safetensors"
    save_file(digits_cnn().state_dict(), weights)
    sidecar = {"num_classes": 10, "in_channels": 1, "normalize_mean": [0.3], "normalize_std": [0.4]}
    (root / "digits.json").write_text(json.dumps(sidecar))
    teacher = ["--model", "zsq.demo:digits_cnn", "--weights", str(weights), "--image-size", "8"]
    folders = {name: root / name for name in ("ait", "gdfq", "minmax")}
    ait = distill_args(teacher, "--ait", "--set", "analyze_every=1", "--set", "rho=0.05")
    assert main([*ait, "--out", str(folders["ait"])]) == 0
    assert main([*distill_args(teacher), "--out", str(folders["gdfq"])]) == 0
    minmax = ["quantize", *teacher, "--device", "cpu", "--quiet"]
    assert main([*minmax, "--out", str(folders["minmax"])]) == 0
    return folders


def metrics_rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000, path


def test_analyze_run_writes_the_logged_numbers_and_plots(runs, capsys):
    run = runs["ait"]
    assert main(["analyze", "run", str(run), "--quiet"]) == 0
    out = run / "analysis"
    for name in ("crossings", "layers_no_change", "probe_kl", "grad_cosines"):
        assert_png(out / f"{name}.png")
    result = json.loads((out / "run.json").read_text())
    rows = metrics_rows(run)
    assert result["method"] == "gdfq+ait" and result["epochs"] == [1, 2, 3]
    trained = [row for row in rows if "crossing_fraction" in row]
    assert [row["epoch"] for row in trained] == [2, 3]  # epoch 1 is the generator warm-up
    layers = list(trained[0]["crossing_fraction"])
    assert result["layers"] == layers
    for layer in layers:
        series = result["crossing_fraction"][layer]
        assert series["epochs"] == [2, 3]
        assert series["values"] == [row["crossing_fraction"][layer] for row in trained]
    zeros = [sum(v == 0 for v in row["crossing_fraction"].values()) for row in trained]
    assert result["layers_with_no_change"]["values"] == zeros
    means = [sum(row["crossing_fraction"].values()) / len(layers) for row in trained]
    assert result["mean_crossing_fraction"]["values"] == means
    for key in ("probe_kl", "rho", "grad_cos_ce_kl"):
        assert result[key]["values"] == [row[key] for row in trained]
    # the inter-epoch cosine is undefined (null) for the first measured epoch
    assert result["grad_cos_epoch"]["epochs"] == [3]
    assert result["grad_cos_epoch"]["values"] == [trained[1]["grad_cos_epoch"]]
    assert result["eval_top1"]["values"] == []  # the run had no --eval-data
    assert "gdfq+ait: 3 epochs" in capsys.readouterr().out


def test_analyze_hessian_on_the_runs_generator(runs):
    run = runs["ait"]
    before = torch.get_rng_state()
    result = measure_hessian(
        run, batch_size=16, probes=3, iters=4, surface_points=5, progress=False
    )
    assert torch.equal(torch.get_rng_state(), before)  # the synthetic draw left the RNG alone
    assert result["real_data"] is False and "generator" in result["data"]
    assert result["kl"] == {"temperature": 20.0, "reduction": "mean", "times_T_squared": True}
    assert result["parameters"]["count"] == result["terms"]["ce"]["density"]["dim"]
    k, radius = result["surface"]["k"], result["surface"]["radius"]
    assert radius == pytest.approx(0.02 * result["parameters"]["weight_norm"])
    assert k[0] == -radius and k[-1] == radius and k[2] == 0.0
    for term in ("ce", "kl"):
        measured = result["terms"][term]
        assert math.isfinite(measured["trace"]["mean"]) and measured["trace"]["probes"] == 3
        assert math.isfinite(measured["top_eigenvalues"][0])
        assert sum(measured["density"]["weights"]) == pytest.approx(1.0, abs=1e-9)
        assert len(measured["density"]["nodes"]) == 4
        assert measured["surface"][2] == measured["loss"]  # k = 0 is the student itself
        assert sum(measured["top_eigenvector_layer_share"].values()) == pytest.approx(1.0)
    # the same seed gives the same batch and probes
    again = measure_hessian(run, batch_size=16, probes=3, iters=4, surface_points=5, progress=False)
    assert again["terms"]["kl"]["trace"] == result["terms"]["kl"]["trace"]


def test_analyze_hessian_cli_on_real_data(runs, tmp_path, capsys):
    from zsq.data import load_dataset
    from zsq.run.finished import student_from_run

    out = tmp_path / "hessian"
    args = ["--probes", "2", "--iters", "3", "--batch-size", "20", "--surface-points", "3"]
    cmd = ["analyze", "hessian", str(runs["minmax"]), "--data", "digits", *args, "--out", str(out)]
    assert main([*cmd, "--quiet", "--device", "cpu"]) == 0
    for name in ("hessian_density", "hessian_surface", "hessian_trace"):
        assert_png(out / f"{name}.png")
    result = json.loads((out / "hessian.json").read_text())
    assert result["real_data"] is True and result["data"].startswith("real:")
    assert "measurement only" in result["data"]
    # CE at the student on the seed-0 choice of 20 test images, recomputed here
    student, _ = student_from_run(runs["minmax"])
    data = load_dataset("digits", split="test", normalize_mean=[0.3], normalize_std=[0.4])
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:20]
    images = torch.stack([data[int(i)][0] for i in chosen])
    labels = torch.tensor([data[int(i)][1] for i in chosen])
    with torch.no_grad():
        expected = float(F.cross_entropy(student(images), labels))
    assert result["terms"]["ce"]["loss"] == pytest.approx(expected, rel=1e-6)
    # the CE/KL gradient cosine at the student, recomputed from the teacher's logits by hand
    from safetensors.torch import load_file

    from zsq.demo import digits_cnn
    from zsq.quant import quant_layers

    teacher = digits_cnn()
    teacher.load_state_dict(load_file(runs["minmax"].parent / "digits.safetensors"))
    teacher.eval()
    weights = [m.weight for _, m in quant_layers(student) if m.wbits is not None]
    for w in weights:
        w.requires_grad_(True)
    with torch.no_grad():
        target = F.softmax(teacher(images) / 20.0, dim=1)
    kl = F.kl_div(F.log_softmax(student(images) / 20.0, dim=1), target, reduction="batchmean")
    grad_kl = torch.cat([g.flatten() for g in torch.autograd.grad(kl, weights)])
    ce = F.cross_entropy(student(images), labels)
    grad_ce = torch.cat([g.flatten() for g in torch.autograd.grad(ce, weights)])
    cosine = float(F.cosine_similarity(grad_ce.double(), grad_kl.double(), dim=0))
    assert result["kl"]["temperature"] == 20.0
    assert result["grad_cos_ce_kl"] == pytest.approx(cosine, abs=1e-4)
    assert "real:" in capsys.readouterr().out


def test_compare_overlays_runs_labelled_by_method(runs, tmp_path):
    out = tmp_path / "compare"
    assert main(["analyze", "compare", str(runs["ait"]), str(runs["gdfq"]), "--out", str(out)]) == 0
    for name in ("probe_kl", "layers_no_change", "mean_crossing", "grad_cosines"):
        assert_png(out / f"compare_{name}.png")
    record = json.loads((out / "compare.json").read_text())
    assert [run["label"] for run in record["runs"]] == ["gdfq+ait", "gdfq"]


def test_labels_fall_back_to_folder_names(runs, tmp_path):
    copy = tmp_path / "gdfq-again"
    shutil.copytree(runs["gdfq"], copy)
    metrics = [read_run_metrics(runs["ait"]), read_run_metrics(runs["gdfq"])]
    assert run_labels([*metrics, read_run_metrics(copy)]) == ["gdfq+ait", "gdfq", "gdfq-again"]
    assert run_labels([metrics[1], metrics[1]]) == ["gdfq (1)", "gdfq (2)"]


def one_line_error(capsys, *args):
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("zsq: error:") and err.count("\n") == 1, err
    return err


def test_errors_exit_2_with_one_line(runs, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    err = one_line_error(capsys, "analyze", "run", str(tmp_path / "notes"))
    assert "not a zsq run folder" in err
    err = one_line_error(capsys, "analyze", "run", str(runs["minmax"]))
    assert "no metrics.jsonl" in err and "post-training" in err
    err = one_line_error(capsys, "analyze", "hessian", str(runs["minmax"]), "--device", "cpu")
    assert "--data" in err
    old = tmp_path / "old-run"
    shutil.copytree(runs["gdfq"], old)
    (old / "generator.safetensors").unlink()
    err = one_line_error(capsys, "analyze", "hessian", str(old), "--device", "cpu")
    assert "predates generator.safetensors" in err and "--data" in err
    err = one_line_error(capsys, "analyze", "compare", str(runs["ait"]), "--out", str(tmp_path))
    assert "at least two" in err
    err = one_line_error(capsys, "analyze", "run", str(runs["ait"]), "--out", "/")
    assert "is the filesystem root" in err
    assert not (tmp_path / "notes" / "analysis").exists()


def test_plots_without_matplotlib_name_the_extra(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    err = one_line_error(capsys, "analyze", "run", str(runs["gdfq"]))
    assert "pip install 'zsq[plots]'" in err
    assert not (runs["gdfq"] / "analysis").exists()


def test_an_analysis_writes_only_into_its_own_folder(runs, tmp_path, capsys):
    """A user's files are never replaced; an analysis again needs --overwrite."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "run.json").write_text("my own notes")
    (mine / "todo.txt").write_text("keep")
    err = one_line_error(capsys, "analyze", "run", str(runs["ait"]), "--out", str(mine))
    assert "holds files zsq did not write (todo.txt)" in err
    assert (mine / "run.json").read_text() == "my own notes"
    out = tmp_path / "analysis"
    assert main(["analyze", "run", str(runs["ait"]), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, "analyze", "run", str(runs["ait"]), "--out", str(out))
    assert "already holds this analysis" in err and "--overwrite" in err
    assert main(["analyze", "run", str(runs["ait"]), "--out", str(out), "--overwrite"]) == 0
    err = one_line_error(
        capsys, "analyze", "compare", str(runs["ait"]), str(runs["ait"]) + "/", "--out", str(out)
    )
    assert "is given twice" in err


def test_compare_refuses_runs_of_different_teachers(runs, tmp_path, capsys):
    from zsq.io import read_marker, write_marker

    other = tmp_path / "other-teacher"
    shutil.copytree(runs["gdfq"], other)
    record = read_marker(other)
    record.pop("zsq_run", None)
    record["options"]["teacher.weights_sha256"] = "0" * 64  # as a run of other weights records
    write_marker(other, record)
    out = tmp_path / "cmp"
    err = one_line_error(
        capsys, "analyze", "compare", str(runs["ait"]), str(other), "--out", str(out)
    )
    assert "quantize different teachers" in err and not out.exists()
