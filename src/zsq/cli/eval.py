"""``zsq eval``: top-1/top-5 of a checkpoint, in full precision or fake-quantized (min/max on
calibration images, as ``zsq quantize --method minmax`` without writing anything)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from zsq.cli._common import add_common, add_model_args, add_quant_args, load_teacher, quant_spec
from zsq.cli.quantize import DOWNLOAD_HELP
from zsq.errors import ZsqError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of a full-precision or fake-quantized model")
    add_model_args(p)
    add_quant_args(p, default_bits="off")
    p.add_argument(
        "--data",
        required=True,
        help="dataset spec, e.g. npz:FILE, cifar10-jpeg:DIR, imagefolder:DIR (see README)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument(
        "--calib",
        help="with --wbits/--abits: a sample source, 'gaussian' (default), zeroq, gdfq, ... "
        "(data-free, at their default settings; `zsq quantize --method minmax --calib-opt` "
        "configures them), or a dataset spec (real data)",
    )
    p.add_argument("--calib-size", type=int, help="calibration images (default 512)")
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_common(p)
    p.set_defaults(func=run)


def _is_quantized(spec) -> bool:
    """Any bits set, globally or by a --layer override (eval defaults to full precision)."""
    bits = [spec.wbits, spec.abits, *(v for o in spec.overrides.values() for v in o.values())]
    return any(b is not None for b in bits)


def run(args: argparse.Namespace) -> int:
    from zsq.data import eval_transform, load_dataset_for
    from zsq.evaluate import evaluate
    from zsq.methods import MinMax
    from zsq.quant import check_layer_patterns, inspect_forward
    from zsq.run.quantize import input_space, quantize
    from zsq.runtime import resolve_device

    started = time.perf_counter()
    spec = quant_spec(args)
    quantized = _is_quantized(spec)
    flags = (("--calib", args.calib), ("--calib-size", args.calib_size))
    calib_flags = [flag for flag, value in flags if value is not None]
    if calib_flags and not quantized:
        it = "it" if len(calib_flags) == 1 else "them"
        raise ZsqError(
            f"{', '.join(calib_flags)}: calibration applies only to a quantized model; drop {it} "
            "or set --wbits/--abits"
        )
    if args.limit is not None and args.limit < 1:
        raise ZsqError(f"--limit must be >= 1, got {args.limit}; leave it out to evaluate all")
    method = None
    if quantized:
        fields = {"calib": args.calib, "calib_size": args.calib_size}
        args.typed = {"calib": "--calib", "calib_size": "--calib-size"}
        method = MinMax.from_fields({k: v for k, v in fields.items() if v is not None})
    teacher, meta, shape = load_teacher(args)
    device = resolve_device(args.device)
    check_layer_patterns(teacher, spec)
    inspect_forward(teacher, shape)  # a shape the model refuses: one line, before the data
    info = input_space(meta, shape)
    dataset = load_dataset_for(args.data, info, download=args.download, limit=args.limit)
    model = teacher
    if method is not None:
        model = quantize(
            teacher, method, image_shape=shape, num_classes=meta.num_classes, quant=spec,
            meta=meta, download=args.download and method.real_data, seed=args.seed,
            device=device, progress=not args.quiet,
        ).student  # fmt: skip
    result = evaluate(model, dataset, device=device, progress=not args.quiet)
    out = {
        "model": meta.model,
        "weights": args.weights,
        "data": args.data,
        "image_shape": list(shape),
        "eval_transform": eval_transform(dataset),
        "wbits": spec.wbits,
        "abits": spec.abits,
        "calibration": method.calib_text if method is not None else None,
        "top1": round(result.top1, 2),
        "top5": round(result.top5, 2),
        "n": result.n,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        print(json.dumps(out))
    else:
        bits = f"W{spec.wbits or 32}A{spec.abits or 32}"
        print(
            f"{meta.model} {bits} on {args.data}: top-1 {out['top1']:.2f}  "
            f"top-5 {out['top5']:.2f}  ({result.n} images)"
        )
    return 0
