"""What the subcommands share: the parser, the teacher/quantization/run flag groups, reading
``KEY=VALUE`` options, loading the teacher, and spelling the library's field names as flags."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from zsq.errors import ZsqError


class Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr, like every other zsq error (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if launched_rank():  # under torchrun every process sees it alike: rank 0 says it
            self.exit(2)
        self.exit(2, f"zsq: error: {message}; see '{self.prog} --help'\n")

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201
        self._refuse_contradictions(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def _refuse_contradictions(self, args: list[str]) -> None:
        """A flag given twice with different values, or with its opposite (``--gi --no-gi``),
        is an error, not "the last one wins". Repeatable flags (``--set``) are exempt."""
        given: dict[str, str] = {}
        for i, token in enumerate(args):
            if token == "--":
                return
            option, eq, inline = token.partition("=")
            option = self._full_option(option) if token.startswith("--") else option
            action = self._option_string_actions.get(option) if token.startswith("-") else None
            if action is None or isinstance(action, REPEATABLE):
                continue
            takes_value = action.nargs != 0
            value = inline if eq else args[i + 1] if takes_value and i + 1 < len(args) else ""
            spelt = f"{option} {value}".strip()
            if action.dest in given and given[action.dest] != spelt:
                self.error(f"{given[action.dest]} and {spelt} contradict each other; give one")
            given[action.dest] = spelt

    def _full_option(self, option: str) -> str:
        """The flag an abbreviation stands for, as argparse reads it (``--no-g`` is ``--no-gi``
        when no other flag starts so); the spelling itself when it is whole or ambiguous."""
        if option in self._option_string_actions or not self.allow_abbrev:
            return option
        matches = [name for name in self._option_string_actions if name.startswith(option)]
        return matches[0] if len(matches) == 1 else option


def launched_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


REPEATABLE = (argparse._AppendAction, argparse._CountAction, argparse._HelpAction)


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def parse_option(item: str, what: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false), else text."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ZsqError(f"bad {what} {item!r}; write KEY=VALUE, e.g. steps=200")
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def parse_options(items: list[str], what: str) -> dict[str, Any]:
    """Each ``KEY=VALUE`` once: a key given again with another value is refused (as a flag
    given twice with two values is), not silently the last."""
    options: dict[str, Any] = {}
    for item in items:
        key, value = parse_option(item, what)
        if key in options and options[key] != value:
            raise ZsqError(
                f"{what} {key}={options[key]!r} and {key}={value!r} contradict each other; give one"
            )
        options[key] = value
    return options


def add_model_args(p: argparse.ArgumentParser) -> None:
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
        "--normalize-mean", type=floats, help="normalisation mean, e.g. 0.485,0.456,0.406"
    )
    g.add_argument("--normalize-std", type=floats, help="normalisation std, e.g. 0.229,0.224,0.225")
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


def add_quant_args(p: argparse.ArgumentParser, default_bits: str | None) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--wbits", default=default_bits, help="weight bits 2..8 or 'off'")
    g.add_argument("--abits", default=default_bits, help="activation bits 2..8 or 'off'")
    g.add_argument("--per-tensor", action="store_true", help="one weight range per tensor")
    g.add_argument("--symmetric", action="store_true", help="symmetric weight quantization")
    g.add_argument(
        "--act-placement",
        choices=("auto", "reference", "input"),
        default="auto",
        help="auto (default): after the ReLU/ReLU6 module a layer's input comes from, as the "
        "official GDFQ/AIT code, else at the layer's input (SiLU, GELU, hardswish, functional "
        "ReLUs), the image kept in full precision; quant.json names each layer's; reference: "
        "only ReLU/ReLU6 outputs; input: every Conv2d/Linear input, the image included",
    )
    g.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="PATTERN=W[/A]",
        help="per-layer override by glob over module names, e.g. conv1=8 or 'linear=off/off'",
    )


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")


def quant_spec(args: argparse.Namespace):
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


def load_teacher(args: argparse.Namespace):
    """The teacher the flags name, its metadata and its input shape (channels, size, size)."""
    from zsq.models import default_image_size
    from zsq.models import load_teacher as load

    kwargs = parse_options(args.model_kwarg, "model argument") or None
    teacher, meta = load(
        args.model,
        args.weights,
        model_kwargs=kwargs,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        normalize_mean=args.normalize_mean,
        normalize_std=args.normalize_std,
        image_size=args.image_size,
        trust_checkpoint=args.trust_checkpoint,
    )
    size = meta.image_size or default_image_size(meta.model)
    return teacher, meta, (meta.in_channels, size, size)


# --- the library's field names as this CLI's flags ---------------------------------------------
FLAGS = {
    "method": "--method",
    "recipe": "--recipe",
    "ait": "--ait",
    "overrides": "--set",
    "source_options": "--source-opt",
    "calib": "--calib",
    "calib_size": "--calib-size",
    "calib_options": "--calib-opt",
    "execution": "--precision/--compile",
    "init": "--init",
    "layers": "--lapq-layers",
    "convention": "--convention",
    "blocks": "--block",
    "work_dir": "--out",
    "work_dir=": "--out ",
    "overwrite=True": "--overwrite",
    "resume=True": "--resume",
    "resume=True, work_dir=": "--resume ",
    "out": "--out",
    "model": "--model",
    "model_kwargs": "--model-kwarg",
    "normalize_std": "--normalize-std",
    "act_placement": "--act-placement",
    "download=True": "--download",
    "in_channels": "--in-channels",
    "image_size": "--image-size",
    "image_size=": "--image-size ",
    "trust_checkpoint=True": "--trust-checkpoint",
    "weights": "--weights",
    "batch_size": "--batch-size",
    "device": "--device",
    "data": "--data",
    "eval_data": "--eval-data",
    "eval_limit": "--eval-limit",
    "download": "--download",
    "seed": "--seed",
    "image_shape": "--image-size (input shape)",
    "num_classes": "--num-classes",
    "quant overrides": "--layer",
    "budget": "--budget",
    "budget=": "--budget ",
    "bits_from": "--bits-from",
    "allocator": "--allocator",
    "choices": "--bit-choices",
    "act_choices": "--act-choices",
    "penalty": "--penalty",
    "wbits": "--wbits",
    "abits": "--abits",
    # the run record's keys (a refused resume names them)
    "method.ait": "--ait",
    "method.init": "--init",
    "method.init.method": "--init",
    "teacher.model": "--model",
    "teacher.model_kwargs": "--model-kwarg",
    "teacher.weights_sha256": "--weights (sha256)",
    "teacher.num_classes": "--num-classes",
    "teacher.in_channels": "--in-channels",
    "teacher.normalize_mean": "--normalize-mean",
    "teacher.normalize_std": "--normalize-std",
    "quant.wbits": "--wbits",
    "quant.abits": "--abits",
    "quant.per_channel": "per-channel weights (--per-tensor)",
    "quant.w_symmetric": "--symmetric",
    "quant.act_placement": "--act-placement",
    "quant.overrides": "--layer",
    "mixed": "mixed precision (--budget, --bits-from, ...)",
    "world_size": "the process count",
}
_PREFIXES = {  # record keys by prefix: the flag that sets the rest of the key
    "method.recipe.": "--set ",
    "method.source_options.": "--source-opt ",
    "method.calib_options.": "--calib-opt ",
    "method.init.calib_options.": "--calib-opt ",
    "method.reconstruction.": "--set ",
    "method.init.reconstruction.": "--init-opt overrides:",
    "quant.": "quant ",
}


def flag_for(field: str, typed: Mapping[str, str] | None = None) -> str | None:
    """How this CLI spells a library field name (or a run-record key): the flag the user typed
    for it when known (``typed``), else the usual one; None where it has no flag."""
    if typed and field in typed:
        return typed[field]
    if field in FLAGS:
        return FLAGS[field]
    for prefix, flag in sorted(_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if field.startswith(prefix):
            return flag + field.removeprefix(prefix)
    if field.startswith("method.init."):  # the init's fields: calibration flags, else --init-opt
        rest = field.removeprefix("method.init.")
        if rest in _CALIBRATION_FIELDS:
            return FLAGS[rest]
        flag = option_flag(rest)
        return flag if flag.startswith("--lapq-opt") else f"--init-opt {rest}"
    if field.startswith("method."):  # a method's own fields
        rest = field.removeprefix("method.")
        return FLAGS.get(rest) or option_flag(rest)
    return None


_CALIBRATION_FIELDS = ("calib", "calib_size", "calib_options", "layers", "convention", "blocks")


def option_flag(field: str) -> str:
    """The ``KEY=VALUE`` flag that sets a method field with no flag of its own: LAPQ's options
    (``--lapq-opt``, also for ``--init lapq``), any other method's (``--method-opt``)."""
    from dataclasses import fields

    from zsq.ptq.lapq import LapqConfig

    lapq = {f.name for f in fields(LapqConfig)}
    return f"--lapq-opt {field}" if field in lapq else f"--method-opt {field}"
