"""``zsq export`` (a finished run's student as integer tensors or ONNX Q/DQ, checked before the
files take their names) and ``zsq eval-export`` (top-1 of such a file)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from zsq.cli._common import add_common
from zsq.errors import ZsqError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a quantize run's student as integer tensors + manifest, or ONNX Q/DQ",
    )
    p.add_argument("dir", help="the output folder of a finished `zsq quantize` run")
    p.add_argument(
        "--format",
        choices=("int", "onnx"),
        required=True,
        help="int: codes (two per byte at 4 bits and below), scales, zero points in safetensors "
        "+ a JSON manifest; onnx: QuantizeLinear/DequantizeLinear graph (needs zsq[onnx])",
    )
    p.add_argument(
        "--out",
        help="file to write (default DIR/student.int.safetensors or DIR/student.onnx); its "
        "folder must exist",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the file(s) the export writes (with --format int also the .json manifest "
        "beside it) when they exist",
    )
    p.add_argument("--sizes", action="store_true", help="print FP32/int8/packed bytes per layer")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_common(p)
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "eval-export",
        help="top-1/top-5 of an exported model: an integer export reloaded, or ONNX in onnxruntime",
    )
    p.add_argument("file", help="a .safetensors integer export or a .onnx file from zsq export")
    p.add_argument("--data", required=True, help="dataset spec (see zsq eval)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure latency at batch 1 and 64 on this machine (about a second each; "
        "--no-latency: top-1 and size only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.set_defaults(func=run_eval_export)


def run_export(args: argparse.Namespace) -> int:
    from zsq.export import size_table
    from zsq.run.export import export_run

    result = export_run(args.dir, args.format, args.out, overwrite=args.overwrite)
    sizes = result["sizes"]
    if not args.sizes:
        result["sizes"] = sizes["total"]
    if args.json:
        print(json.dumps(result))
    else:
        check = result["check"]
        print(f"wrote {result['out']} ({result['bytes']:,} bytes); {check['summary']}")
        if args.sizes:
            print(size_table(sizes))
    return 0


def run_eval_export(args: argparse.Namespace) -> int:
    from zsq.data import load_dataset_for
    from zsq.evaluate import evaluate

    started = time.perf_counter()
    path = Path(args.file)
    if path.suffix == ".onnx":
        from zsq.export.onnx import OnnxRuntimeModel

        model = OnnxRuntimeModel(path)
        info, runtime = model.info, "onnxruntime (CPU)"
    elif path.suffix == ".safetensors":
        from zsq.export import read_manifest
        from zsq.export.integer import int_student

        manifest, tensors = read_manifest(path)
        model, info, runtime = (
            int_student(manifest, tensors, path),
            manifest["model"],
            "zsq (PyTorch)",
        )
    else:
        raise ZsqError(f"{path}: give a .onnx or .safetensors file written by zsq export")
    if "image_shape" not in info or "num_classes" not in info:
        raise ZsqError(f"{path} has no zsq metadata (image shape, classes); export it with zsq")
    if args.limit is not None and args.limit < 1:
        raise ZsqError(f"--limit must be >= 1, got {args.limit}; leave it out to evaluate all")
    dataset = load_dataset_for(args.data, info, limit=args.limit)
    result = evaluate(model, dataset, device="cpu", progress=not args.quiet)
    speeds = _latencies(model, info["image_shape"]) if args.latency else []
    out = {
        "file": str(path),
        "runtime": runtime,
        "data": args.data,
        "top1": round(result.top1, 2),
        "top5": round(result.top5, 2),
        "n": result.n,
        "bytes": path.stat().st_size,
        "latency": speeds,
        "seconds": round(time.perf_counter() - started, 2),
    }
    text = f"top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  ({result.n} images)"
    speed = "; ".join(
        f"batch {s['batch']}: {s['ms_per_image']:.3f} ms/image, {s['images_per_second']:,.0f}/s"
        for s in speeds
    )
    size = f"{out['bytes'] / 1e3:,.1f} kB"
    line = f"{path.name} in {runtime}: {text}; {size}" + (f"; {speed}" if speeds else "")
    print(json.dumps(out) if args.json else line)
    return 0


def _latencies(model: Any, image_shape: list[int]) -> list[dict[str, float]]:
    """Latency at batch 1 and 64 on this machine (random images; the threads torch or
    onnxruntime use by default)."""
    import torch

    from zsq.export.speed import latency, session_runner

    session = getattr(model, "session", None)
    if session is not None:
        run = session_runner(session)
    else:

        def run(x: Any) -> Any:
            with torch.no_grad():
                return model(torch.from_numpy(x))

    return [latency(run, image_shape, batch, seconds=0.5) for batch in (1, 64)]
