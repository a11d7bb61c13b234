"""The payoff where the model is deployed: one network exported in FP32 and quantized, all run by
onnxruntime on this machine (issue 26, `docs/results.md` section 13).

    PATH=.venv/bin:$PATH python benchmarks/deploy_speed.py [--runs DIR ...] [--threads 1 2]

Rows: the FP32 teacher (ResNet-20 on CIFAR-10-JPEG from the shared data) exported to ONNX, and
W8A8 and W4A4 students: min/max (Gaussian calibration, data-free) unless ``--runs`` names
finished `zsq quantize` folders, whose students are used instead. Per row and thread count:
top-1 on the test images in onnxruntime, the ONNX file's size, the weights' size packed at their
width (`zsq export --sizes`), latency per image at batch 1 and 64 and throughput, with
onnxruntime's default graph optimisations (ORT_ENABLE_ALL, what a deployment runs), and the
operators of the optimised graph: integer kernels (QLinearConv, ConvInteger, MatMulInteger) or
DequantizeLinear feeding float Conv/Gemm. One JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnxruntime as ort
import torch

from zsq.data import load_dataset_for
from zsq.evaluate import evaluate
from zsq.export import export_onnx, size_report
from zsq.export.onnx import OnnxRuntimeModel
from zsq.export.speed import latency, ops_text, optimized_ops, session_runner
from zsq.models import load_teacher
from zsq.paths import shared_data_dir
from zsq.ptq import calibrate_activations, gaussian_batches
from zsq.quant import QuantSpec, quantize_model
from zsq.run.finished import student_from_run

SHAPE = (3, 32, 32)
INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm")


def students(teacher: torch.nn.Module, runs: list[Path]) -> list[tuple[str, torch.nn.Module]]:
    fp32 = quantize_model(teacher, QuantSpec(wbits=None, abits=None)).eval()
    rows = [("FP32", fp32)]
    if runs:
        for run in runs:
            student, _ = student_from_run(run)
            rows.append((run.name, student))
        return rows
    for bits in (8, 4):
        student = quantize_model(teacher, QuantSpec(wbits=bits, abits=bits), SHAPE)
        calibrate_activations(student, gaussian_batches(512, SHAPE, seed=0))
        rows.append((f"W{bits}A{bits} min/max", student.eval()))
    return rows


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(name: str, student, path: Path, data, threads: int) -> dict:
    runtime = OnnxRuntimeModel(path, threads)
    runtime.session = session(path, threads)  # the deployed graph, not the check's
    top1 = evaluate(runtime, data, device="cpu", progress=False).top1
    run = session_runner(runtime.session)
    speeds = {b: latency(run, SHAPE, b, seconds=3.0) for b in (1, 64)}
    ops = optimized_ops(path, "all", threads)
    return {
        "model": name,
        "threads": threads,
        "top1": round(top1, 2),
        "onnx_bytes": path.stat().st_size,
        "packed_weight_bytes": size_report(student)["total"]["packed"],
        "ms_per_image_b1": speeds[1]["ms_per_image"],
        "ms_per_image_b64": speeds[64]["ms_per_image"],
        "images_per_second_b64": speeds[64]["images_per_second"],
        "integer_kernels": sum(ops[op] for op in INTEGER_OPS),
        "ops": ops_text(ops, 8),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="*", type=Path, default=[])
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/deploy"))
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    shared = shared_data_dir()
    teacher, meta = load_teacher("resnet20", shared / "weights" / "resnet20_cifar10jpeg.pt")
    info = {"image_shape": list(SHAPE), "num_classes": 10, "normalize_mean": meta.normalize_mean,
            "normalize_std": meta.normalize_std}  # fmt: skip
    data = load_dataset_for(f"cifar10-jpeg:{shared / 'cifar10-jpeg'}", info, limit=args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, student in students(teacher.eval(), args.runs):
        path = args.out / f"{name.split()[0]}.onnx"
        export_onnx(student, path, SHAPE, info, overwrite=True)  # the benchmark's own folder
        for threads in args.threads:
            row = measure(name, student, path, data, threads)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nonnxruntime {ort.__version__}, torch {torch.__version__}\n")
    print("| model | threads | top-1 | ONNX file | weights packed | ms/image b1 | ms/image b64 "
          "| images/s b64 | integer kernels | optimised graph (top ops) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['threads']} | {r['top1']:.2f} | {r['onnx_bytes'] / 1e3:.0f} kB "
            f"| {r['packed_weight_bytes'] / 1e3:.0f} kB | {r['ms_per_image_b1']:.3f} "
            f"| {r['ms_per_image_b64']:.3f} | {r['images_per_second_b64']:,.0f} "
            f"| {r['integer_kernels']} | {r['ops']} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
