"""Exported models against the PyTorch student: top-1 on real data, outputs, latency, sizes.

    PATH=.venv/bin:$PATH python benchmarks/export_parity.py RUN_DIR [RUN_DIR ...] \
        [--out runs/export] [--mobilenet] [--threads 1]

For each `zsq quantize` output folder: export to int and ONNX, then top-1 of the PyTorch
fake-quant student (rebuilt from the folder), of the reloaded integer export and of the ONNX
model in onnxruntime on the run's --eval-data (all of it), and onnxruntime's CPU latency per
image beside the PyTorch FP32 teacher's. ``--mobilenet``: torchvision mobilenet_v2 with random
weights (seed 0) at W8A8 and W4A4 min/max (Gaussian calibration), outputs compared on a batch.
One JSON line per measurement; the size table of each run in markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from zsq.data import load_dataset_for
from zsq.evaluate import evaluate
from zsq.export import export_int, export_onnx, load_int, size_report, size_table
from zsq.export.onnx import OnnxRuntimeModel
from zsq.io import read_marker
from zsq.run.finished import student_from_run


def latency_ms(model, image_shape, batch: int, repeats: int = 20) -> float:
    x = torch.randn(batch, *image_shape)
    with torch.no_grad():
        model(x)
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return round((time.perf_counter() - started) / repeats / batch * 1e3, 3)


def run_parity(run_dir: Path, out: Path, threads: int) -> None:
    student, info = student_from_run(run_dir)
    options = read_marker(run_dir)["options"]
    name = run_dir.name
    int_path, onnx_path = out / f"{name}.int.safetensors", out / f"{name}.onnx"
    export_int(student, int_path, info, overwrite=True)  # --out is the benchmark's own folder
    export_onnx(student, onnx_path, tuple(info["image_shape"]), info, overwrite=True)
    data = load_dataset_for(options["--eval-data"], info)
    runtime = OnnxRuntimeModel(onnx_path, threads)
    tops = {}
    for label, model in (
        ("pytorch", student),
        ("int_reloaded", load_int(int_path)),
        ("onnxruntime", runtime),
    ):
        started = time.perf_counter()
        tops[label] = evaluate(model, data, device="cpu", progress=False).top1
        tops[f"{label}_seconds"] = round(time.perf_counter() - started, 1)
    from zsq.models import load_teacher

    teacher, _ = load_teacher(
        options["--model"], None, num_classes=info["num_classes"], in_channels=info["in_channels"]
    )
    shape = tuple(info["image_shape"])
    print(
        json.dumps(
            {
                "run": str(run_dir),
                "method": info["method"],
                "n": len(data),
                **tops,
                "onnx_bytes": onnx_path.stat().st_size,
                "int_bytes": int_path.stat().st_size,
                "latency_ms_per_image": {
                    "onnxruntime_b1": latency_ms(runtime, shape, 1),
                    "onnxruntime_b64": latency_ms(runtime, shape, 64),
                    "pytorch_fp32_b1": latency_ms(teacher.eval(), shape, 1),
                    "pytorch_fp32_b64": latency_ms(teacher.eval(), shape, 64),
                    "pytorch_fakequant_b64": latency_ms(student, shape, 64),
                },
                "threads": threads,
            }
        ),
        flush=True,
    )
    print(size_table(size_report(student)), flush=True)


@torch.no_grad()
def live_batchnorm(model: torch.nn.Module, shape: tuple[int, int, int]) -> None:
    """BN statistics from noise: a randomly initialised torchvision model's activations vanish
    layer by layer in eval mode (running stats 0/1), which makes any output comparison empty."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        model(torch.randn(16, *shape, generator=gen))
    model.eval()


def run_mobilenet(out: Path, threads: int) -> None:
    from zsq.models import create_model
    from zsq.ptq import calibrate_activations, gaussian_batches
    from zsq.quant import QuantSpec, quantize_model

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=1000)
    shape = (3, 224, 224)
    live_batchnorm(model, shape)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    for bits in (8, 4):
        spec = QuantSpec(wbits=bits, abits=bits, act_placement="reference")  # as section 8 ran
        student = quantize_model(model, spec)
        calibrate_activations(student, gaussian_batches(64, shape, 32, seed=0))
        student.eval()
        path = export_onnx(
            student, out / f"mobilenet_v2_w{bits}a{bits}.onnx", shape, overwrite=True
        )
        runtime = OnnxRuntimeModel(path, threads)
        with torch.no_grad():
            expected, got = student(x), runtime(x)
        print(
            json.dumps(
                {
                    "model": "mobilenet_v2 (random weights, seed 0, BN statistics from noise)",
                    "bits": f"W{bits}A{bits}",
                    "batch": len(x),
                    "max_abs_diff": float((got - expected).abs().max()),
                    "max_abs_logit": float(expected.abs().max()),
                    "argmax_agreement": float((got.argmax(1) == expected.argmax(1)).float().mean()),
                    "onnx_bytes": path.stat().st_size,
                    "latency_ms_per_image_onnxruntime_b8": latency_ms(runtime, shape, 8, repeats=5),
                    "latency_ms_per_image_pytorch_fp32_b8": latency_ms(model, shape, 8, repeats=5),
                    "threads": threads,
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/export"))
    parser.add_argument("--mobilenet", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        run_parity(run, args.out, args.threads)
    if args.mobilenet:
        run_mobilenet(args.out, args.threads)


if __name__ == "__main__":
    main()
