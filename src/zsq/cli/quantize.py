"""``zsq quantize``: flags into a method config and the run's options, then :func:`zsq.quantize`.

Every flag sets a field of the chosen method's config (or of its ``init``); a flag for a field
the method does not have is refused by the config, and the message names the flag.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zsq.cli._common import (
    add_common,
    add_model_args,
    add_quant_args,
    flag_for,
    load_teacher,
    parse_options,
    quant_spec,
)
from zsq.errors import ZsqError

DOWNLOAD_HELP = (
    "fetch cifar10, cifar100 or fashion-mnist data into the spec's folder with torchvision "
    "(needs a network)"
)
RECIPE_HELP = (
    "distillation schedule: paper-cifar (default: the papers' 400 epochs x 200 iterations "
    "at batch 200, 80,000 iterations, about 2 days on a 2-core CPU for ResNet-20), "
    "paper-imagenet, short (22 x 25 at batch 32, 5-6 minutes on 2 idle CPU cores), demo; a run "
    "logs its size first and a time estimate after its first iterations. For genie: paper "
    "(default: the reference's 4,000 distillation iterations per batch of 128 and 20,000 "
    "reconstruction iterations per block, an estimated 9 hours for ResNet-20 on 1,024 images on a "
    "2-core CPU) or short (about 15 minutes for ResNet-20 on 1,024 images on 2 idle CPU cores)"
)


def add_parser(sub: Any) -> None:
    from zsq.execution import COMPILE_FLAGS, PRECISIONS
    from zsq.methods.base import get_method, method_list, method_names, startable_methods

    p = sub.add_parser("quantize", help="quantize a teacher and write the student")
    add_model_args(p)
    add_quant_args(p, default_bits="4")
    summaries = "; ".join(f"{name}: {get_method(name).summary}" for name in method_names())
    p.add_argument(
        "--method",
        default="minmax",
        choices=method_names(),
        help=f"minmax (default). {summaries}",
    )
    p.add_argument("--out", help="output directory (created atomically)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run writing to DIR")
    g = p.add_argument_group(f"distillation ({method_list('distillation')})")
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
        help="override any recipe field, e.g. --set epochs=10 --set rho=1e-3 (genie: a "
        "reconstruction field, e.g. --set iters=500 --set drop_prob=0)",
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
    starts = startable_methods()
    g.add_argument(
        "--init",
        choices=starts,
        help="start the student from a post-training result (LAPQ's quantized, bias-corrected "
        "weights and its activation ranges, or genie's reconstructed student) instead of the "
        "float copy; it calibrates on --calib",
    )
    g.add_argument(
        "--init-opt",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a field of the --init method's config, e.g. recipe=short for --init genie",
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
    g = p.add_argument_group(f"post-training ({method_list('post-training')}; and --init)")
    g.add_argument(
        "--calib",
        help="calibration images: a sample source, gaussian, zeroq, gdfq, qimera, arc, genie, "
        "psaq or mimiq (data-free; default gaussian for minmax, zeroq for lapq and --init lapq, "
        "genie for genie and --init genie), or a dataset "
        "spec (real training images: not zero-shot, and the report says so)",
    )
    g.add_argument(
        "--calib-size", type=int, help="calibration images (default 512; 1,024 for genie)"
    )
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
    p.add_argument(
        "--method-opt",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any field of the method's config by name (zsq.methods; e.g. a plugin method's)",
    )
    g = p.add_argument_group("reconstruction (genie; and --init genie)")
    g.add_argument(
        "--convention",
        choices=("paper", "all"),
        help="paper (default): first and last layers' weights at 8 bits, the image unquantized, "
        "as the reconstruction papers; all: every layer at --wbits/--abits, as the AIT line",
    )
    g.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="CLASS",
        help="class name of a model's own block to reconstruct as one unit (repeatable; "
        "ResNet units, inverted residuals and timm transformer blocks are found by themselves)",
    )
    add_mixed_args(p)
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common(p)
    p.set_defaults(func=run)


def add_mixed_args(p: argparse.ArgumentParser) -> None:
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


# --- flags -> configs ---------------------------------------------------------------------------
class Fields:
    """A config's fields as flags set them, remembering which flag set which field (so that a
    refusal names the flag the user typed)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.flags: dict[str, str] = {}

    def set(self, field: str, value: Any, flag: str) -> None:
        if field in self.values and self.values[field] != value:  # two flags, one field
            raise ZsqError(
                f"{self.flags[field]} and {flag} both set {field} ({self.values[field]!r} and "
                f"{value!r}); give one"
            )
        self.values[field] = value
        self.flags[field] = flag


def method_config(args: argparse.Namespace, typed: dict[str, str]):
    """The config of ``--method`` from the flags; ``typed`` receives field -> flag."""
    from zsq.methods import get_method

    config_type = get_method(args.method).config
    own = Fields()
    _schedule_fields(args, own, config_type)
    calibration = Fields()
    _calibration_fields(args, calibration)
    if args.init is not None:
        _init_option_fields(args, calibration)
        typed.update(calibration.flags)
        typed["method"] = "--init"  # a refusal of the start's config names the method it starts
        own.set("init", get_method(args.init).config.from_fields(calibration.values), "--init")
        typed.pop("method")
    elif args.init_opt:
        raise ZsqError("--init-opt sets a field of the --init method; give --init too")
    else:
        for name, value in calibration.values.items():
            own.set(name, value, calibration.flags[name])
    _source_fields(args, own, config_type)
    for name, value in parse_options(args.method_opt, "method option").items():
        own.set(name, value, f"--method-opt {name}")
    typed.update(own.flags)
    return config_type.from_fields(own.values)


def _init_option_fields(args: argparse.Namespace, fields: Fields) -> None:
    """``--init-opt KEY=VALUE``: a field of the start's config, or, for a start that has
    ``overrides`` (genie's reconstruction fields), a key of those."""
    from dataclasses import fields as config_fields

    from zsq.methods import get_method

    names = {f.name for f in config_fields(get_method(args.init).config) if f.init}
    overrides: dict[str, Any] = {}
    for name, value in parse_options(args.init_opt, "init option").items():
        if name not in names and "overrides" in names:
            overrides[name] = value
        else:
            fields.set(name, value, f"--init-opt {name}")
    if overrides:
        fields.set("overrides", overrides, "--init-opt")


def _schedule_fields(args: argparse.Namespace, fields: Fields, config_type: type) -> None:
    """The recipe and its overrides (a distillation's recipe fields, or for another method its
    own ``overrides``, e.g. genie's reconstruction fields), precision and compilation."""
    from zsq.execution import Execution
    from zsq.methods.base import method_list
    from zsq.methods.distillation import Distillation
    from zsq.recipes import parse_overrides

    if args.recipe is not None:
        fields.set("recipe", args.recipe, "--recipe")
    if args.ait:
        fields.set("ait", True, "--ait")
    shortcuts = {"loss": "--loss", "gi": "--gi/--no-gi", "optimizer": "--optimizer"}
    shortcuts["lr_mult"] = "--lr-mult"
    overrides = {k: getattr(args, k) for k in shortcuts if getattr(args, k) is not None}
    given = [shortcuts[k] for k in overrides] + (["--set"] if args.set else [])
    if issubclass(config_type, Distillation):
        overrides.update(parse_overrides(args.set))
    elif overrides:  # a distillation's shortcuts, not fields of this method's overrides
        shown = ", ".join(shortcuts[k] for k in overrides)
        raise ZsqError(
            f"{shown} {'has' if len(overrides) == 1 else 'have'} no effect with --method "
            f"{args.method} (an option of {method_list('distillation')}); drop "
            f"{'it' if len(overrides) == 1 else 'them'}"
        )
    else:
        overrides.update(parse_options(args.set, "override"))
    if overrides:
        fields.set("overrides", overrides, "/".join(given))
    execution = Execution.from_flags(args.precision, args.compile)
    if execution != Execution():
        fields.set("execution", execution, "--precision/--compile")


def _calibration_fields(args: argparse.Namespace, fields: Fields) -> None:
    if args.calib is not None:
        fields.set("calib", args.calib, "--calib")
    if args.calib_size is not None:
        fields.set("calib_size", args.calib_size, "--calib-size")
    if args.calib_opt:
        fields.set(
            "calib_options", parse_options(args.calib_opt, "calibration option"), "--calib-opt"
        )
    if args.lapq_layers is not None:
        fields.set("layers", args.lapq_layers, "--lapq-layers")
    if args.convention is not None:
        fields.set("convention", args.convention, "--convention")
    if args.block:
        fields.set("blocks", tuple(args.block), "--block")
    for name, value in parse_options(args.lapq_opt, "LAPQ option").items():
        fields.set(name, value, f"--lapq-opt {name}")


def _source_fields(args: argparse.Namespace, fields: Fields, config_type: type) -> None:
    """``--source-opt``: the method's sample source, which for a post-training method is its
    calibration source (given once, by either flag)."""
    from dataclasses import fields as config_fields

    if not args.source_opt:
        return
    options = parse_options(args.source_opt, "source option")
    names = {f.name for f in config_fields(config_type)}
    if "source_options" not in names and "calib_options" in names:
        if "calib_options" in fields.values:
            raise ZsqError(
                f"method {args.method}'s only source is its calibration source: give its "
                "options once, with --calib-opt (or --source-opt)"
            )
        fields.set("calib_options", options, "--source-opt")
    else:
        fields.set("source_options", options, "--source-opt")


def mixed_config(args: argparse.Namespace):
    """``--budget``/``--bits-from`` and their options, or None when no such flag is given."""
    from zsq.mixed.allocate import MixedConfig

    options = parse_options(args.alloc_opt, "allocator option")
    given = {
        "budget": args.budget,
        "bits_from": args.bits_from,
        "allocator": args.allocator,
        "choices": args.bit_choices,
        "penalty": args.penalty,
        "act_choices": args.act_choices,
        **{k: options.pop(k) for k in ("source", "samples", "probes", "steps") if k in options},
    }
    given = {k: v for k, v in given.items() if v is not None}
    if options:
        given["source_options"] = options
    if not given:
        return None
    return MixedConfig(**given)


# --- the command --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
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
        from zsq.run.report import report_markdown

        print(report_markdown(report), end="")
    return 0


def _quantize(args: argparse.Namespace) -> dict:
    from zsq.run.quantize import quantize

    if bool(args.out) == bool(args.resume):
        raise ZsqError("give exactly one of --out DIR (new run) or --resume DIR (continue a run)")
    if args.resume and args.model is None and args.weights is None:
        raise ZsqError(
            f"--resume {args.resume} needs every option the run started with, the teacher's "
            "included: repeat its command with --out DIR replaced by --resume DIR (an "
            "interrupted run printed it)"
        )
    if args.trust_checkpoint and args.weights is None:
        raise ZsqError("--trust-checkpoint has no effect without --weights; drop it")
    args.typed = {}  # field -> the flag that set it, for messages
    method = method_config(args, args.typed)
    spec, mixed = quant_spec(args), mixed_config(args)
    teacher, meta, shape = load_teacher(args)
    result = quantize(
        teacher,
        method,
        image_shape=shape,
        num_classes=meta.num_classes,
        quant=spec,
        mixed=mixed,
        meta=meta,
        eval_data=args.eval_data,
        eval_limit=args.eval_limit,
        download=args.download,
        work_dir=Path(args.out or args.resume),
        overwrite=args.overwrite,
        resume=bool(args.resume),
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    return result.report


__all__ = ["add_parser", "flag_for", "method_config", "mixed_config", "run"]
