"""The analysis hooks on a ViT run, as on CNNs: crossing shares and GI kappas for every quantized
layer, ``zsq analyze run`` reporting what the run logged, ``zsq analyze hessian`` on real images.

One tiny MimiQ+AIT run of the Fashion-MNIST ViT teacher (W4A4; 3 epochs of 2 steps at batch 4,
the first a warm-up; a pool of 8 images synthesised in 2 steps) is made once for the module
through the CLI, in a few seconds.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from zsq.cli import main
from zsq.paths import shared_data_dir

pytest.importorskip("timm")
pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
RHO = 0.05
STEPS = 2  # student steps per epoch (iters_per_epoch)
WARMUP_KAPPA_CAP = 128  # kappa during the GI warm-up epoch (see zsq.distill.inundation)
# the ViT student's quantized layers, in module order: patch embedding, 4 blocks, head
LAYERS = [
    "patch_embed.proj",
    *[
        f"blocks.{block}.{part}"
        for block in range(4)
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ],
    "head",
]
TINY_HESSIAN = ["--probes", "2", "--iters", "3", "--batch-size", "8", "--surface-points", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The folder of a finished MimiQ+AIT run with gradient cosines logged every step."""
    weights = shared_data_dir() / "weights" / "vit_fashionmnist.safetensors"
    if not weights.is_file():
        pytest.skip(f"ViT teacher not found under {shared_data_dir()}")
    sets = [
        "epochs=3",
        f"iters_per_epoch={STEPS}",
        "batch_size=4",
        "gen_warmup_epochs=1",
        "act_calib_epochs=1",
        "probe_batch_size=8",
        "analyze_every=1",
        f"rho={RHO}",
    ]
    folder = tmp_path_factory.mktemp("vit") / "mimiq-ait"
    args = [
        "quantize",
        "--weights",
        str(weights),
        "--method",
        "mimiq",
        "--ait",
        "--recipe",
        "demo",
        *[arg for item in sets for arg in ("--set", item)],
        *["--source-opt", "steps=2", "--source-opt", "num_images=8"],
        *["--wbits", "4", "--abits", "4", "--device", "cpu", "--quiet", "--out", str(folder)],
    ]
    assert main(args) == 0
    return folder


def metrics_rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def student_layers(folder):
    """The run's student rebuilt from its folder (eval mode) and its quantized layers by name."""
    from zsq.quant import quant_layers
    from zsq.run.finished import student_from_run

    student, info = student_from_run(folder)
    return student.eval(), info, dict(quant_layers(student))


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000, path


def test_every_quantized_vit_layer_logs_its_crossing_share_and_kappa(run):
    _, _, layers = student_layers(run)
    assert list(layers) == LAYERS
    assert all(layer.wbits == 4 for layer in layers.values())
    rows = metrics_rows(run)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert "crossing_fraction" not in rows[0]  # epoch 1 only synthesises and observes ranges
    for row in rows[1:]:
        assert list(row["crossing_fraction"]) == LAYERS
        assert list(row["kappa"]) == LAYERS
        assert row["rho"] == RHO
        for name, share in row["crossing_fraction"].items():
            # the epoch mean of per-step shares: (changed in step 1 + step 2) / (2 x numel)
            changed = share * STEPS * layers[name].weight.numel()
            assert abs(changed - round(changed)) < 1e-2 and 0 <= share <= 1, (name, share)
        # the CE/KL cosine was measured at every step; the epoch value is their mean
        steps = row["grad_cos_ce_kl_steps"]
        assert len(steps) == STEPS and all(-1 <= c <= 1 for c in steps)
        assert row["grad_cos_ce_kl"] == pytest.approx(sum(steps) / STEPS, abs=1e-12)
        assert math.isfinite(row["probe_kl"]) and row["probe_kl"] >= 0
    warmup, trained = rows[1], rows[2]
    assert all(1 <= kappa <= WARMUP_KAPPA_CAP for kappa in warmup["kappa"].values())
    assert all(kappa >= 1 for kappa in trained["kappa"].values())
    # after its warm-up, GI scales every layer's update to change about rho of its weights a step
    shares = trained["crossing_fraction"]
    assert all(RHO / 2 <= share <= 2 * RHO for share in shares.values()), shares
    assert trained["grad_cos_epoch"] is not None and -1 <= trained["grad_cos_epoch"] <= 1


def test_analyze_run_reports_what_the_vit_run_logged(run, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "run", str(run), "--out", str(out), "--quiet"]) == 0
    for name in ("crossings", "layers_no_change", "probe_kl", "grad_cosines"):
        assert_png(out / f"{name}.png")
    result = json.loads((out / "run.json").read_text())
    assert result["method"] == "mimiq+ait" and result["epochs"] == [1, 2, 3]
    assert result["layers"] == LAYERS
    trained = [row for row in metrics_rows(run) if "crossing_fraction" in row]
    for layer in LAYERS:
        series = result["crossing_fraction"][layer]
        assert series["epochs"] == [2, 3]
        assert series["values"] == [row["crossing_fraction"][layer] for row in trained]
    zeros = [sum(v == 0 for v in row["crossing_fraction"].values()) for row in trained]
    assert result["layers_with_no_change"]["values"] == zeros
    means = [sum(row["crossing_fraction"].values()) / len(LAYERS) for row in trained]
    assert result["mean_crossing_fraction"]["values"] == means
    for key in ("probe_kl", "rho", "grad_cos_ce_kl"):  # probe_kl: the KL over training
        assert result[key] == {"epochs": [2, 3], "values": [row[key] for row in trained]}
    assert result["grad_cos_epoch"] == {"epochs": [3], "values": [trained[1]["grad_cos_epoch"]]}
    assert result["eval_top1"]["values"] == []  # the run had no --eval-data
    printed = capsys.readouterr().out
    assert f"mimiq+ait: 3 epochs; last epoch {zeros[-1]} of {len(LAYERS)} layers" in printed
    assert not (run / "analysis").exists()  # --out was given


def test_analyze_hessian_without_data_draws_from_the_runs_image_pool(run, tmp_path, capsys):
    """A ViT run keeps its pool of synthesised images (not a generator): the synthetic batch is
    drawn from it; with the pool gone, one line says to give --data."""
    from safetensors.torch import load_file

    out = tmp_path / "hessian"
    cmd = ["analyze", "hessian", str(run), *TINY_HESSIAN, "--device", "cpu", "--out", str(out)]
    assert main([*cmd, "--quiet"]) == 0
    result = json.loads((out / "hessian.json").read_text())
    assert result["real_data"] is False and "mimiq images (synthetic.safetensors)" in result["data"]
    assert result["parameters"]["layers"] == LAYERS
    pool = load_file(str(run / "synthetic.safetensors"))["images"]
    assert pool.shape[0] == 8  # num_images=8: every drawn image is one of them
    copy = tmp_path / "run-without-pool"
    shutil.copytree(run, copy)
    (copy / "synthetic.safetensors").unlink()
    capsys.readouterr()
    again = ["analyze", "hessian", str(copy), *TINY_HESSIAN, "--out", str(tmp_path / "none")]
    assert main([*again, "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zsq: error:") and err.count("\n") == 1, err
    assert "--data" in err and "images it distilled on are gone" in err
    assert not (tmp_path / "none").exists()


def test_analyze_hessian_on_fashion_mnist_measures_every_vit_layer(run, tmp_path, capsys):
    from zsq.models import load_teacher
    from zsq.numerics.losses import kl_to_teacher

    folder = shared_data_dir() / "fashion-mnist"
    if not folder.is_dir():
        pytest.skip(f"Fashion-MNIST not found under {shared_data_dir()}")
    out = tmp_path / "hessian"
    spec = f"fashion-mnist:{folder}"
    cmd = ["analyze", "hessian", str(run), "--data", spec, *TINY_HESSIAN, "--out", str(out)]
    assert main([*cmd, "--quiet", "--device", "cpu"]) == 0
    for name in ("hessian_density", "hessian_surface", "hessian_trace"):
        assert_png(out / f"{name}.png")
    result = json.loads((out / "hessian.json").read_text())
    assert result["method"] == "mimiq+ait" and result["real_data"] is True
    assert result["data"].startswith("real: 8 labelled test images of fashion-mnist:")
    assert result["kl"] == {"temperature": 20.0, "reduction": "mean", "times_T_squared": True}
    student, info, layers = student_layers(run)
    weights = [layers[name].weight for name in LAYERS]
    assert result["parameters"]["layers"] == LAYERS
    assert result["parameters"]["count"] == sum(w.numel() for w in weights)
    norm = math.sqrt(sum(float(w.detach().double().pow(2).sum()) for w in weights))
    assert result["parameters"]["weight_norm"] == pytest.approx(norm, rel=1e-9)
    # the losses at the student on the seed-0 choice of 8 test images, recomputed here
    images, labels = chosen_test_images(spec, info, 8)
    teacher, _ = load_teacher(None, result_weights(run))
    with torch.no_grad():
        target = teacher(images)
    logits = student(images)
    agreement = float((logits.argmax(1) == labels).float().mean()) * 100
    assert result["student_agreement_on_batch"] == pytest.approx(agreement, abs=0.01)
    ce = F.cross_entropy(logits, labels)
    kl = kl_to_teacher(logits, target, 20.0, "mean")
    assert result["terms"]["ce"]["loss"] == pytest.approx(float(ce.detach()), rel=1e-6)
    assert result["terms"]["kl"]["loss"] == pytest.approx(float(kl.detach()), rel=1e-6)
    # the CE/KL gradient cosine at the student's quantized weights, by hand
    grad_ce = torch.autograd.grad(ce, weights, retain_graph=True)
    grad_kl = torch.autograd.grad(kl, weights)
    flat_ce, flat_kl = (torch.cat([g.flatten() for g in grads]) for grads in (grad_ce, grad_kl))
    cosine = float(F.cosine_similarity(flat_ce.double(), flat_kl.double(), dim=0))
    assert result["grad_cos_ce_kl"] == pytest.approx(cosine, abs=1e-4)
    assert result["surface"]["k"][1] == 0.0
    for term in ("ce", "kl"):
        measured = result["terms"][term]
        assert measured["trace"]["probes"] == 2 and math.isfinite(measured["trace"]["mean"])
        assert math.isfinite(measured["top_eigenvalues"][0])
        assert measured["density"]["dim"] == result["parameters"]["count"]
        assert sum(measured["density"]["weights"]) == pytest.approx(1.0, abs=1e-9)
        assert measured["surface"][1] == measured["loss"]  # k = 0 is the student itself
        share = measured["top_eigenvector_layer_share"]
        assert list(share) == LAYERS and sum(share.values()) == pytest.approx(1.0)
    assert "real:" in capsys.readouterr().out


def result_weights(folder):
    """The teacher weights the run's report names."""
    return json.loads((folder / "report.json").read_text())["weights"]


def chosen_test_images(spec, info, count):
    """The ``count`` test images a seed-0 permutation picks first, normalised as the teacher's
    input, and their true labels."""
    from zsq.data import load_dataset_for

    data = load_dataset_for(spec, info)
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    images = torch.stack([data[int(i)][0] for i in chosen])
    return images, torch.tensor([int(data[int(i)][1]) for i in chosen])
