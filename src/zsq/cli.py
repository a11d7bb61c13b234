"""Command line: parse, build a config, call the library, print the result. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zsq.errors import ZsqError

log = logging.getLogger("zsq")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr, like every other zsq error (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"zsq: error: {message}; see '{self.prog} --help'\n")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument(
        "--model",
        help="resnet20/32/44/56, a torchvision name, timm:NAME (zsq[vit]) or pkg.mod:fn; may be "
        "left out when the weights' .json sidecar names it",
    )
    g.add_argument(
        "--model-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor argument of the model (over the sidecar's model_kwargs), e.g. "
        "img_size=28 for a timm ViT",
    )
    g.add_argument("--weights", help=".safetensors/.pt/.pth/.th; a <stem>.json sidecar is read")
    g.add_argument("--num-classes", type=int, help="class count (default: sidecar, else 10)")
    g.add_argument("--in-channels", type=int, help="input channels (default: sidecar, else 3)")
    g.add_argument(
        "--normalize-mean", type=_floats, help="normalisation mean, e.g. 0.485,0.456,0.406"
    )
    g.add_argument(
        "--normalize-std", type=_floats, help="normalisation std, e.g. 0.229,0.224,0.225"
    )
    g.add_argument(
        "--image-size",
        type=int,
        help="input height=width (default: the sidecar's image_size, else 32 for the CIFAR "
        "ResNets, 224 otherwise); image folders are resized to it, other data must match it",
    )
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow an unsafe pickle checkpoint (only for files you trust)",
    )


def _add_quant_args(p: argparse.ArgumentParser, default_bits: str | None) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--wbits", default=default_bits, help="weight bits 2..8 or 'off'")
    g.add_argument("--abits", default=default_bits, help="activation bits 2..8 or 'off'")
    g.add_argument("--per-tensor", action="store_true", help="one weight range per tensor")
    g.add_argument("--symmetric", action="store_true", help="symmetric weight quantization")
    g.add_argument(
        "--act-placement",
        choices=("input", "reference"),
        default="reference",
        help="reference (default): every ReLU/ReLU6 output, as the official GDFQ/AIT code; "
        "input: every Conv2d/Linear input, the image included (harsher; functional ReLUs)",
    )
    g.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="PATTERN=W[/A]",
        help="per-layer override by glob over module names, e.g. conv1=8 or 'linear=off/off'",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")


def _quant_spec(args: argparse.Namespace):
    from zsq.quant import QuantSpec, parse_bits, parse_override

    overrides = dict(parse_override(text) for text in args.layer)
    return QuantSpec(
        wbits=parse_bits(args.wbits),
        abits=parse_bits(args.abits),
        per_channel=not args.per_tensor,
        w_symmetric=args.symmetric,
        act_placement=args.act_placement,
        overrides=overrides,
    )


def _teacher_config(args: argparse.Namespace):
    from zsq.pipeline import TeacherConfig

    return TeacherConfig(
        model=args.model,
        weights=args.weights,
        model_kwargs=dict(_parse_option(i, "model argument") for i in args.model_kwarg) or None,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        normalize_mean=args.normalize_mean,
        normalize_std=args.normalize_std,
        image_size=args.image_size,
        trust_checkpoint=args.trust_checkpoint,
    )


def _calib_options(args: argparse.Namespace) -> dict[str, Any]:
    """--calib/--calib-size as QuantizeConfig fields (unset: the method's default, 512 images)."""
    options: dict[str, Any] = {"calib": args.calib}
    if args.calib_size is not None:
        options["calib_size"] = args.calib_size
    return options


def _is_quantized(spec) -> bool:
    """Any bits set, globally or by a --layer override (eval defaults to full precision)."""
    bits = [spec.wbits, spec.abits, *(v for o in spec.overrides.values() for v in o.values())]
    return any(b is not None for b in bits)


def cmd_eval(args: argparse.Namespace) -> int:
    from zsq.data import eval_transform
    from zsq.evaluate import evaluate
    from zsq.pipeline import QuantizeConfig, build_context, resolved_calib, run_minmax

    started = time.perf_counter()
    spec = _quant_spec(args)
    quantized = _is_quantized(spec)
    flags = (("--calib", args.calib), ("--calib-size", args.calib_size))
    calib_flags = [flag for flag, value in flags if value is not None]
    if calib_flags and not quantized:
        it = "it" if len(calib_flags) == 1 else "them"
        raise ZsqError(
            f"{', '.join(calib_flags)}: calibration applies only to a quantized model; drop {it} "
            "or set --wbits/--abits"
        )
    cfg = QuantizeConfig(
        teacher=_teacher_config(args),
        out=Path("."),
        eval_data=args.data,
        eval_limit=args.limit,
        quant=spec,
        seed=args.seed,
        device=args.device,
        download=args.download,
        progress=not args.quiet,
        **_calib_options(args),
    )
    ctx = build_context(cfg, work_dir=None)  # eval writes nothing
    model = run_minmax(ctx).student if quantized else ctx.teacher
    result = evaluate(model, ctx.eval_set, device=ctx.device, progress=not args.quiet)
    out = {
        "model": ctx.config.teacher.model,
        "weights": args.weights,
        "data": args.data,
        "image_shape": list(ctx.image_shape),
        "eval_transform": eval_transform(ctx.eval_set),
        "wbits": spec.wbits,
        "abits": spec.abits,
        "calibration": resolved_calib(cfg) if quantized else None,
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
            f"{ctx.config.teacher.model} {bits} on {args.data}: top-1 {out['top1']:.2f}  "
            f"top-5 {out['top5']:.2f}  ({result.n} images)"
        )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """One run; under torchrun every process runs this and rank 0 prints the report."""
    from zsq import distributed

    try:
        current = distributed.init_from_env(args.device)
        report = _quantize(args)
        distributed.barrier()  # every rank finished its work before any tears the group down
    finally:
        distributed.shutdown()
    if not current.is_main:
        return 0
    if args.json:
        print(json.dumps(report))
    else:
        from zsq.pipeline import report_markdown

        print(report_markdown(report), end="")
    return 0


def _quantize(args: argparse.Namespace) -> dict:
    from zsq.pipeline import QuantizeConfig, run_quantize

    if bool(args.out) == bool(args.resume):
        raise ZsqError("give exactly one of --out DIR (new run) or --resume DIR (continue a run)")
    if args.resume and args.model is None and args.weights is None:
        raise ZsqError(
            f"--resume {args.resume} needs every option the run started with, the teacher's "
            "included: repeat its command with --out DIR replaced by --resume DIR (an "
            "interrupted run printed it)"
        )
    _refuse_unused_flags(args)
    cfg = QuantizeConfig(
        teacher=_teacher_config(args),
        out=Path(args.out or args.resume),
        resume=bool(args.resume),
        method_options=_method_options(args),
        method=args.method,
        quant=_quant_spec(args),
        eval_data=args.eval_data,
        eval_limit=args.eval_limit,
        **_calib_options(args),
        download=args.download,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
        mixed=_mixed_config(args),
    )
    return run_quantize(cfg)


def _refuse_unused_flags(args: argparse.Namespace) -> None:
    """Flags the method would silently ignore are errors, named as the user typed them."""
    from zsq.methods import GENERATOR_METHODS, check_method, refuse_unused

    check_method(args.method)
    if args.method in GENERATOR_METHODS:
        given = {
            "--calib": args.calib is not None and args.init is None,
            "--calib-size": args.calib_size is not None and args.init is None,
            "--calib-opt": bool(args.calib_opt) and args.init is None,
        }
    else:
        given = {
            "--recipe": args.recipe is not None,
            "--ait": args.ait,
            "--loss": args.loss is not None,
            "--gi/--no-gi": args.gi is not None,
            "--optimizer": args.optimizer is not None,
            "--lr-mult": args.lr_mult is not None,
            "--set": bool(args.set),
            "--precision": args.precision != "fp32",
            "--compile": args.compile != "off",
            "--init": args.init is not None,
        }
    refuse_unused(args.method, given)


def _method_options(args: argparse.Namespace) -> dict:
    """Recipe name, AIT switch and explicit overrides (flags, then --set), as the API takes them."""
    from zsq.execution import Execution
    from zsq.recipes import parse_overrides

    flags = ("loss", "gi", "optimizer", "lr_mult")
    overrides = {f: getattr(args, f) for f in flags if getattr(args, f) is not None}
    overrides.update(parse_overrides(args.set))
    lapq = dict(_parse_option(item, "LAPQ option") for item in args.lapq_opt)
    if args.lapq_layers is not None:
        lapq["layers"] = args.lapq_layers
    return {
        "init": args.init,
        "lapq": lapq or None,
        "recipe": args.recipe,
        "ait": args.ait,
        "overrides": overrides,
        "source_options": dict(_parse_option(item, "source option") for item in args.source_opt),
        "calib_options": dict(_parse_option(item, "calibration option") for item in args.calib_opt),
        "execution": Execution.from_flags(args.precision, args.compile),
    }


def _parse_option(item: str, what: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false), else text."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ZsqError(f"bad {what} {item!r}; write KEY=VALUE, e.g. steps=200")
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def cmd_export(args: argparse.Namespace) -> int:
    """Integer tensors + manifest, or ONNX Q/DQ, from a quantize output folder; checked before
    the files take their names."""
    from zsq.export import export_run, size_table

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


def cmd_eval_export(args: argparse.Namespace) -> int:
    """Top-1/top-5 of an exported model (integer export reloaded, or ONNX in onnxruntime)."""
    from zsq.data import load_dataset_for
    from zsq.evaluate import evaluate

    started = time.perf_counter()
    path = Path(args.file)
    if path.suffix == ".onnx":
        from zsq.export.onnx import OnnxRuntimeModel

        model = OnnxRuntimeModel(path)
        info, runtime = model.info, "onnxruntime (CPU)"
    elif path.suffix == ".safetensors":
        from zsq.export import load_int, read_manifest

        model, info, runtime = load_int(path), read_manifest(path)[0]["model"], "zsq (PyTorch)"
    else:
        raise ZsqError(f"{path}: give a .onnx or .safetensors file written by zsq export")
    if "image_shape" not in info or "num_classes" not in info:
        raise ZsqError(f"{path} has no zsq metadata (image shape, classes); export it with zsq")
    dataset = load_dataset_for(args.data, info)
    if args.limit is not None:
        if args.limit < 1:
            raise ZsqError(f"--limit must be >= 1, got {args.limit}")
        dataset = _first(dataset, args.limit)
    result = evaluate(model, dataset, device="cpu", progress=not args.quiet)
    out = {
        "file": str(path),
        "runtime": runtime,
        "data": args.data,
        "top1": round(result.top1, 2),
        "top5": round(result.top5, 2),
        "n": result.n,
        "seconds": round(time.perf_counter() - started, 2),
    }
    text = f"top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  ({result.n} images)"
    print(json.dumps(out) if args.json else f"{path.name} in {runtime}: {text}")
    return 0


def _first(dataset: Any, limit: int) -> Any:
    from torch.utils.data import Subset

    return Subset(dataset, range(min(limit, len(dataset))))


def cmd_demo(args: argparse.Namespace) -> int:
    from zsq.demo import run_demo

    print(run_demo(seed=args.seed, device=args.device, progress=not args.quiet))
    return 0


def _analysis_dir(out: str | None, default: Path) -> Path:
    """Where analysis files go: ``--out``, else ``default``; created when the files are written."""
    folder = Path(out) if out else default
    if folder.resolve() == Path(folder.resolve().anchor):
        raise ZsqError(f"--out {out} is the filesystem root; name a folder for the analysis")
    if folder.exists() and not folder.is_dir():
        raise ZsqError(f"--out {folder} is a file; give a folder for the analysis files")
    return folder


def _wrote(folder: Path, files: list[Path]) -> str:
    return f"wrote {', '.join(f.name for f in files)} to {folder}"


def cmd_analyze_run(args: argparse.Namespace) -> int:
    """Weight-update crossings, layers without change and probe KL of one run, with plots."""
    from zsq.analysis import plots
    from zsq.analysis.runs import read_run_metrics
    from zsq.io import write_json

    plots.require_matplotlib()
    metrics = read_run_metrics(args.dir)
    out = _analysis_dir(args.out, Path(args.dir) / "analysis")
    runs, labels = [metrics], [metrics.method]
    files = [
        plots.plot_crossings(metrics, out / "crossings.png"),
        plots.plot_no_change(runs, labels, out / "layers_no_change.png"),
        plots.plot_probe_kl(runs, labels, out / "probe_kl.png"),
    ]
    if metrics.grad_cos_ce_kl.values:
        files.append(plots.plot_grad_cosines(runs, labels, out / "grad_cosines.png"))
    write_json(out / "run.json", metrics.to_dict())
    files.append(out / "run.json")
    last = metrics.no_change_layers
    summary = f"{metrics.method}: {len(metrics.epochs)} epochs"
    if last.values:
        summary += f"; last epoch {last.values[-1]} of {len(metrics.layers)} layers unchanged"
    if metrics.probe_kl.values:
        summary += (
            f"; probe KL {metrics.probe_kl.values[0]:.4g} -> {metrics.probe_kl.values[-1]:.4g}"
        )
    print(summary)
    print(_wrote(out, files))
    return 0


def cmd_analyze_hessian(args: argparse.Namespace) -> int:
    """CE and KL Hessians at a run's student on one batch: JSON, density and surface plots."""
    from zsq.analysis import plots
    from zsq.analysis.measure import measure_hessian
    from zsq.io import write_json

    plots.require_matplotlib()
    out = _analysis_dir(args.out, Path(args.dir) / "analysis")
    result = measure_hessian(
        args.dir,
        batch_size=args.batch_size,
        probes=args.probes,
        iters=args.iters,
        top_k=args.top_k,
        surface_points=args.surface_points,
        surface_radius=args.surface_radius,
        data=args.data,
        weights=args.weights,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
        time_limit_s=args.time_limit,
    )
    files = [
        plots.plot_density(result, out / "hessian_density.png"),
        plots.plot_surface(result, out / "hessian_surface.png"),
        plots.plot_traces(result, out / "hessian_trace.png"),
    ]
    write_json(out / "hessian.json", result)
    files.append(out / "hessian.json")
    print(f"{result['method']} on {result['data']}")
    for name, term in result["terms"].items():
        trace = term["trace"]
        error = f" ± {trace['std_error']:.3g}" if trace["std_error"] is not None else ""
        eigen = ", ".join(f"{v:.4g}" for v in term["top_eigenvalues"])
        print(
            f"  {name}: loss {term['loss']:.4g}  trace {trace['mean']:.4g}{error} "
            f"({trace['probes']} probes)  top eigenvalue {eigen}"
        )
    print(f"{result['seconds']:.1f} s; {_wrote(out, files)}")
    return 0


def cmd_analyze_compare(args: argparse.Namespace) -> int:
    """Several runs overlaid: probe KL, layers with no change, mean crossing share."""
    from zsq.analysis import plots
    from zsq.analysis.runs import read_run_metrics, run_labels
    from zsq.io import write_json

    if len(args.dirs) < 2:
        raise ZsqError("give at least two run folders to compare")
    plots.require_matplotlib()
    runs = [read_run_metrics(folder) for folder in args.dirs]
    labels = run_labels(runs)
    out = _analysis_dir(args.out, Path())  # --out is required here
    files = [
        plots.plot_probe_kl(runs, labels, out / "compare_probe_kl.png"),
        plots.plot_no_change(runs, labels, out / "compare_layers_no_change.png"),
        plots.plot_mean_crossing(runs, labels, out / "compare_mean_crossing.png"),
    ]
    if any(run.grad_cos_ce_kl.values for run in runs):
        files.append(plots.plot_grad_cosines(runs, labels, out / "compare_grad_cosines.png"))
    record = {"runs": [{"label": lb, **r.to_dict()} for lb, r in zip(labels, runs, strict=True)]}
    write_json(out / "compare.json", record)
    files.append(out / "compare.json")
    print(_wrote(out, files))
    return 0


DOWNLOAD_HELP = (
    "fetch cifar10, cifar100 or fashion-mnist data into the spec's folder with torchvision "
    "(needs a network)"
)
RECIPE_HELP = (
    "generator methods' schedule: paper-cifar (default: the papers' 400 epochs x 200 iterations "
    "at batch 200, 80,000 iterations, about 100 hours on a 2-core CPU for ResNet-20), "
    "paper-imagenet, short (22 x 25 at batch 32, 5-6 minutes on 2 idle CPU cores), demo; a run "
    "logs its size first and a time estimate after its first iterations"
)


def build_parser() -> argparse.ArgumentParser:
    from zsq.execution import COMPILE_FLAGS, PRECISIONS
    from zsq.methods import METHOD_NAMES

    parser = _Parser(
        prog="zsq", description="Zero-shot (data-free) quantization of PyTorch classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="top-1/top-5 of a full-precision or fake-quantized model")
    _add_model_args(p)
    _add_quant_args(p, default_bits="off")
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
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a teacher and write the student")
    _add_model_args(p)
    _add_quant_args(p, default_bits="4")
    p.add_argument(
        "--method",
        default="minmax",
        choices=METHOD_NAMES,
        help="post-training: minmax (default; seconds), zeroq (min/max on ZeroQ distilled "
        "images), lapq (loss-aware clipping); or a distillation method: gdfq, qimera, arc (CNNs "
        "with BatchNorm), psaq, mimiq (vision transformers)",
    )
    p.add_argument("--out", help="output directory (created atomically)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run writing to DIR")
    g = p.add_argument_group("distillation (generator methods)")
    g.add_argument("--recipe", help=RECIPE_HELP)
    g.add_argument("--ait", action="store_true", help="AIT: KL-only loss + gradient inundation")
    g.add_argument("--loss", choices=("ce+kl", "kl", "ce"), help="student loss (Table 2 rows)")
    g.add_argument("--gi", dest="gi", action="store_true", default=None, help="gradient inundation")
    g.add_argument("--no-gi", dest="gi", action="store_false", help="no gradient inundation")
    g.add_argument("--optimizer", choices=("sgd", "adam", "rmsprop"), help="student optimiser")
    g.add_argument("--lr-mult", type=float, help="multiply the student lr (Table 2 'high lr': 100)")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any recipe field, e.g. --set epochs=10 --set rho=1e-3",
    )
    g.add_argument(
        "--source-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="sample-source option (the generator's, or the synthetic --calib source's), e.g. "
        "qimera's mix_prob=0.4, zeroq's steps=500 or precision=bf16, train_steps=200 for a "
        "generator used as --calib",
    )
    g.add_argument(
        "--init",
        choices=("lapq",),
        help="start the student from LAPQ's result (quantized, bias-corrected weights and its "
        "activation ranges) instead of the float copy; LAPQ calibrates on --calib",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (exact), tf32 (GPU tensor cores), bf16 (tf32 + bfloat16 teacher/generator)",
    )
    g.add_argument(
        "--compile",
        choices=COMPILE_FLAGS,
        default="off",
        help="torch.compile teacher, student, generator and the GI search "
        "(reduce-overhead = CUDA graphs)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--eval-data", help="dataset spec to measure accuracy on (never trained on)")
    p.add_argument("--eval-limit", type=int, help="evaluate only the first N images")
    g = p.add_argument_group("post-training (minmax, zeroq, lapq; and --init lapq)")
    g.add_argument(
        "--calib",
        help="calibration images: a sample source, gaussian, zeroq, gdfq, qimera or arc "
        "(data-free; default gaussian for minmax, zeroq for lapq and --init lapq), or a dataset "
        "spec (real training images: not zero-shot, and the report says so)",
    )
    g.add_argument("--calib-size", type=int, help="calibration images (default 512)")
    g.add_argument(
        "--calib-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of a synthetic --calib source, e.g. steps=500 or cache=FILE for zeroq, "
        "train_steps=200 for a generator (with a post-training method --source-opt is the same)",
    )
    g.add_argument(
        "--lapq-layers",
        choices=("all", "paper"),
        help="all (default): every Conv2d/Linear quantized; paper: first conv, last conv and "
        "classifier in full precision, as the LAPQ reference",
    )
    g.add_argument(
        "--lapq-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="LAPQ option: stages=lw|lw+qa|lw+qa+powell, bias_correction=false, maxiter=1, "
        "maxfev=N, p_grid=2,2.5,3,..., lw_p=2, xtol=0.01",
    )
    _add_mixed_args(p)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "budget", help="per-layer parameters, MACs, bytes and BOPs; totals at uniform 2..8 bits"
    )
    _add_model_args(p)
    p.add_argument("--abits", default="4", help="activation bits for the BOPs columns (4)")
    p.add_argument("--budget", help="also show what this budget allows, e.g. wbits=3.5")
    p.add_argument("--quiet", action="store_true", help="no info logs")
    p.set_defaults(func=cmd_budget)

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
    _add_common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "eval-export",
        help="top-1/top-5 of an exported model: an integer export reloaded, or ONNX in onnxruntime",
    )
    p.add_argument("file", help="a .safetensors integer export or a .onnx file from zsq export")
    p.add_argument("--data", required=True, help="dataset spec (see zsq eval)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.set_defaults(func=cmd_eval_export)

    p = sub.add_parser(
        "demo",
        help="train a digits CNN and quantize it with min/max and GDFQ with and without AIT (about "
        "2 minutes on 2 CPU cores; no files, no network)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    _add_analyze(sub)
    return parser


def _add_mixed_args(p: argparse.ArgumentParser) -> None:
    from zsq.mixed.allocate import ALLOCATORS

    g = p.add_argument_group("mixed precision (per-layer bit widths under a budget)")
    g.add_argument(
        "--budget",
        help="hard budget: size=1.2MB (packed weights), bops=2.5G, or wbits=4.0 (mean weight "
        "bits, parameter-weighted); see `zsq budget`",
    )
    g.add_argument("--bit-choices", help="candidate weight widths (default 2,3,4,5,6,8)")
    g.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        help="sensitivity (default; ZeroQ's KL per layer), hessian (HAWQ-V2), constrained "
        "(HDX-style search with a hard budget), penalty (its soft-penalty baseline)",
    )
    g.add_argument(
        "--act-choices",
        help="candidate activation widths under a bops= budget (sensitivity allocator; default "
        "the --bit-choices, 'off' keeps every activation at --abits)",
    )
    g.add_argument("--penalty", type=float, help="penalty weight (--allocator penalty)")
    g.add_argument("--bits-from", metavar="FILE", help="reuse a run's bits.json (or its folder)")
    g.add_argument(
        "--alloc-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="source=zeroq|gaussian|gdfq|... (the allocator's synthetic images), samples=64, "
        "probes=20 (hessian), steps=200 (search); other keys go to the source, e.g. cache=FILE",
    )


def _mixed_config(args: argparse.Namespace):
    from zsq.mixed.allocate import MixedConfig

    options = dict(_parse_option(item, "allocator option") for item in args.alloc_opt)
    return MixedConfig.from_flags(
        args.budget,
        args.allocator,
        args.bit_choices,
        args.penalty,
        args.bits_from,
        options,
        act_choices=args.act_choices,
    )


def cmd_budget(args: argparse.Namespace) -> int:
    """The cost model of a teacher: what each layer costs, and uniform widths in total."""
    from zsq.mixed.allocate import cost_problem
    from zsq.mixed.cost import cost_table, layer_costs, parse_budget
    from zsq.models import load_teacher
    from zsq.pipeline import model_image_shape
    from zsq.quant import parse_bits

    budget = parse_budget(args.budget) if args.budget else None  # a bad one: before any work
    teacher_cfg = _teacher_config(args)
    fields = {k: v for k, v in vars(teacher_cfg).items() if k not in ("model", "weights")}
    teacher, meta = load_teacher(teacher_cfg.model, teacher_cfg.weights, **fields)
    name = teacher_cfg.model or meta.model
    shape = model_image_shape(name, meta)
    abits = parse_bits(args.abits)
    costs = layer_costs(teacher, shape)
    print(f"{name} at input {shape}, activations {abits or 32} bits\n")
    print(cost_table(costs, abits))
    if budget is not None:
        _, _, limit = cost_problem(teacher, shape, budget, (2, 3, 4, 5, 6, 8), abits)
        print(f"\nbudget {budget.text}: {limit:.6g} in layer-cost units ({budget.kind})")
    return 0


def _add_analyze(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="the AIT paper's Sec. 3 measurements on finished runs: weight updates, KL over "
        "training, Hessian of CE vs KL; JSON and PNG plots (needs zsq[plots])",
    )
    modes = p.add_subparsers(dest="analysis", metavar="{run,hessian,compare}", required=True)

    a = modes.add_parser(
        "run", help="crossing shares per layer, layers with no change, probe KL of one run"
    )
    a.add_argument("dir", help="the output folder of a finished generator-method quantize run")
    a.add_argument("--out", help="folder for run.json and the plots (default DIR/analysis)")
    a.add_argument("--quiet", action="store_true", help="no info logs")
    a.set_defaults(func=cmd_analyze_run)

    a = modes.add_parser(
        "hessian",
        help="Hessian trace, top eigenvalue, eigenvalue density and loss surface of CE and KL "
        "at the run's student, on one batch",
    )
    a.add_argument("dir", help="the output folder of a finished quantize run")
    a.add_argument(
        "--data",
        help="real labelled test images (dataset spec, measurement only) instead of a batch "
        "from the run's generator (needed for runs without generator.safetensors)",
    )
    a.add_argument("--batch-size", type=int, default=200, help="images in the batch (200)")
    a.add_argument("--probes", type=int, default=100, help="Hutchinson probes per term (100)")
    a.add_argument(
        "--iters", type=int, default=30, help="power iterations and Lanczos steps per term (30)"
    )
    a.add_argument("--top-k", type=int, default=1, help="top eigenvalues per term (1)")
    a.add_argument(
        "--surface-points", type=int, default=21, help="loss-surface points along k (21)"
    )
    a.add_argument(
        "--surface-radius",
        type=float,
        default=0.02,
        help="loss surface from -K to K along the unit top eigenvector, K this fraction of the "
        "weights' norm (0.02: the paper's +-0.5 on a CIFAR ResNet-20)",
    )
    a.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="seconds for the trace probes of both terms together (each stops after the probe "
        "crossing its half)",
    )
    a.add_argument(
        "--weights", help="the teacher's weights, where the path in the run's report is not found"
    )
    a.add_argument("--out", help="folder for hessian.json and the plots (default DIR/analysis)")
    _add_common(a)
    a.set_defaults(func=cmd_analyze_hessian)

    a = modes.add_parser(
        "compare", help="overlay runs: probe KL, layers with no change, mean crossing share"
    )
    a.add_argument("dirs", nargs="+", metavar="DIR", help="two or more finished run folders")
    a.add_argument("--out", required=True, help="folder for compare.json and the plots")
    a.add_argument("--quiet", action="store_true", help="no info logs")
    a.set_defaults(func=cmd_analyze_compare)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so a run cleans up and keeps its checkpoint as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_message(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command left behind: a run to resume (and the command), or nothing."""
    hint = _resume_hint(args, argv)
    if hint is None:
        return "interrupted"
    return "interrupted" + hint


def _resume_hint(args: argparse.Namespace, argv: list[str]) -> str | None:
    """`` before the first checkpoint; nothing was kept`` or ``; continue with: zsq ...``; None
    for commands that leave no run behind."""
    target = getattr(args, "out", None) or getattr(args, "resume", None)
    if args.command != "quantize" or not target:
        return None
    from zsq.io import checkpoint_file, partial_dir

    try:
        resumable = checkpoint_file(partial_dir(target)).exists()
    except ZsqError:
        resumable = False
    if not resumable:
        return " before the first checkpoint; nothing was kept"
    return "; continue with: " + shlex.join([*_launcher(), *_resume_argv(argv)])


def _launcher() -> list[str]:
    """``zsq``, or the torchrun command this process was started by (same process count)."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ["zsq"]
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(size))
    return ["torchrun", f"--nproc-per-node={per_node}", "-m", "zsq"]


def _is_process_group_failure(err: Exception) -> bool:
    """A collective that failed because another rank stopped (or the group timed out)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    return isinstance(err, (dist.DistError, RuntimeError))


def _group_failure_message(err: Exception, args: argparse.Namespace, argv: list[str]) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[0][:160] if lines else type(err).__name__
    hint = _resume_hint(args, argv) or ""
    return f"the process group failed ({detail}); another process of the run stopped{hint}"


def _resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--out DIR`` (or an abbreviation argparse accepted) as ``--resume DIR``."""
    resumed = []
    for token in argv:
        key, eq, value = token.partition("=")
        is_out = key.startswith("--") and len(key) > 3 and "--out".startswith(key)
        resumed.append("--resume" + eq + value if is_out else token)
    return resumed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the other ranks only warn
    logging.basicConfig(
        level=logging.WARNING if args.quiet or rank else logging.INFO,
        format=("" if not rank else f"[rank {rank}] ") + "%(levelname)s %(name)s: %(message)s",
    )
    from zsq.execution import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        with _sigterm_as_interrupt():
            return args.func(args)
    except ZsqError as err:
        print(f"zsq: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not _is_process_group_failure(err):
            raise
        print(f"zsq: error: {_group_failure_message(err, args, argv)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(f"zsq: {_interrupted_message(args, argv)}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130
