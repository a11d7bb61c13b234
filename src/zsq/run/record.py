"""The run record: what defines a run's result, kept in its folder's marker, checked on resume.

Keys are config field paths (``method.recipe.epochs``, ``quant.wbits``, ``teacher.model``), so
library messages speak the library's words and a front end spells them its own way. Records
written before zsq 0.1's method configs named the CLI's flags (``--set epochs``); they are read
through :func:`upgrade`, so those runs still resume, export and analyse.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zsq._version import __version__
from zsq.data import same_dataset
from zsq.errors import ConfigError, ZsqError
from zsq.io import read_marker, read_verified, sha256_file
from zsq.layout import RunLayout
from zsq.methods.base import MethodConfig, get_method
from zsq.mixed.allocate import bits_file
from zsq.models import ModelMeta
from zsq.quant import QuantSpec

RECORD_VERSION = 2  # 1: keys were CLI flags (upgraded on read)
UNSET = "(unset)"


def run_options(
    method: MethodConfig,
    *,
    quant: QuantSpec,
    meta: ModelMeta,
    image_shape: tuple[int, int, int],
    seed: int,
    eval_data: str | None,
    eval_limit: int | None,
    mixed: Any = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Every option that defines the run's result, by field path, as JSON values.

    Speed-only options (device, precision, compile, progress) are left out; the teacher is
    identified by the sha256 of its weights file, not by its path.
    """
    spec = quant.to_dict()
    spec.pop("quantized_inputs")  # found from the teacher under auto placement: not an option
    options: dict[str, Any] = {
        "method": method.method,
        **flatten("method", method.record()),
        "teacher.model": meta.model,
        "teacher.model_kwargs": meta.model_kwargs or None,
        "teacher.weights_sha256": _file_digest(meta.weights),
        "teacher.num_classes": meta.num_classes,
        "teacher.in_channels": meta.in_channels,
        "teacher.normalize_mean": meta.normalize_mean,
        "teacher.normalize_std": meta.normalize_std,
        "image_shape": image_shape,
        "seed": seed,
        "eval_data": eval_data,  # else metrics.jsonl would mix two evaluation sets
        "eval_limit": eval_limit,
        **{f"quant.{key}": value for key, value in spec.items()},
        "mixed": mixed.to_dict() if mixed is not None else None,
        "world_size": world_size,
    }
    return json.loads(json.dumps(options))  # as read back from the record: tuples become lists


def flatten(prefix: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"recipe": {"epochs": 3}}`` -> ``{"prefix.recipe.epochs": 3}``; an empty dict leaves
    no key (as an option never given)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        path = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(path, value))
        else:
            flat[path] = value
    return flat


def _file_digest(path: str | None) -> str | None:
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


def marker_record(
    options: dict[str, Any], sessions: list[float], files: dict[str, str] | None = None
) -> dict[str, Any]:
    """What ``.zsq-run`` holds; ``files``: the sha256 of every file a finished run wrote."""
    record = {
        "record_version": RECORD_VERSION,
        "zsq_version": __version__,
        "options": options,
        "sessions": sessions,
    }
    if files is not None:
        record["files"] = files
    return record


def file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of each file of a finished run (not the marker, not hidden files)."""
    return {
        path.name: sha256_file(path)
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".")
    }


def check_file_digests(folder: Path, record: Mapping[str, Any]) -> None:
    """Refuse a run whose files differ from what it wrote (damaged, truncated or edited).
    Runs written before zsq recorded digests pass unchecked."""
    for name, digest in (record.get("files") or {}).items():
        path = folder / name
        if path.is_file() and sha256_file(path) != digest:
            raise ZsqError(
                f"{path} is not the file the run wrote (its sha256 differs from the one in "
                f"{RunLayout.MARKER}: damaged or edited); run the quantize again"
            )


def check_bits_source(bits_from: str | Path) -> None:
    """A ``bits.json`` reused from a finished run is the one it wrote."""
    path = bits_file(bits_from)
    digest = ((read_marker(path.parent) or {}).get("files") or {}).get(path.name)
    if digest is not None:
        check_file_digests(path.parent, {"files": {path.name: digest}})


def read_options(record: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a marker record, upgraded to field paths when an older zsq wrote it."""
    options = dict(record.get("options") or {})
    return options if record.get("record_version") == RECORD_VERSION else upgrade(options)


# --- resume ---------------------------------------------------------------------------------
def sessions_before(out: Path, work: Path, options: dict[str, Any]) -> list[float]:
    """The seconds of the earlier sessions of the run in ``work`` (``OUT.partial``), after
    checking it can continue exactly: the same run-defining options and an intact checkpoint."""
    record = read_marker(work) or {}
    restart = f"start it again with «work_dir=»{out} «overwrite=True»"
    if "options" not in record:
        raise ConfigError(f"{work} does not record the options it started with; {restart}")
    saved = read_options(record)
    _check_same_world(saved, options, out)
    changed = differences(saved, options, marked=True)
    if changed:
        raise ConfigError(
            f"cannot resume {out}: options differ from those the run started with "
            f"({', '.join(changed)}); resume with the same options, or start a new run",
        )
    try:
        read_verified(RunLayout(work).checkpoint, fix=restart)
    except ConfigError:
        raise
    except ZsqError as err:  # a damaged checkpoint: the advice names the run's options
        raise ConfigError(str(err)) from None
    return [float(s) for s in record.get("sessions", [])]


def _check_same_world(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """A run continues with the number of processes it started with (each has its own RNG
    stream, and the batch is split that many ways)."""
    before, now = saved.get("world_size") or 1, current.get("world_size") or 1
    if before != now:
        raise ConfigError(
            f"cannot resume {out}: it ran as {before} process(es), this is {now}; resume with "
            f"torchrun and {before} processes in all (torchrun's --nproc-per-node x nodes)"
            if before > 1
            else f"cannot resume {out}: it ran as one process, this is {now}; resume it without "
            "torchrun"
        )


PLACEMENT = "quant.act_placement"


def _reference_then_auto(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """A run that started under ``reference`` (the default before ``auto``) continues under
    ``auto`` when the two build the same student: checked once the teacher is loaded
    (:func:`check_resumed_placement`)."""
    return saved.get(PLACEMENT) == "reference" and current.get(PLACEMENT) == "auto"


def check_resumed_placement(
    work: Path, out: Path, quant: QuantSpec, options: dict[str, Any]
) -> dict[str, Any]:
    """Refuse to continue a ``reference``-placement run under an ``auto`` placement that
    quantizes some layer's input: a different student. The options to record: a run that
    started under ``reference`` stays recorded so, whichever of the two its resumes name."""
    saved = read_options(read_marker(work) or {})
    if saved.get(PLACEMENT) == "reference" and quant.act_placement == "auto":
        if quant.quantized_inputs:
            raise ConfigError(
                f"cannot resume {out}: it started with the reference activation placement, "
                f"which on this model is not auto's ({len(quant.quantized_inputs)} layer input(s) "
                "differ); resume with «act_placement» reference"
            )
        return {**options, PLACEMENT: "reference"}
    return options


def differences(
    saved: dict[str, Any], current: dict[str, Any], shown: int = 6, marked: bool = False
) -> list[str]:
    """``["quant.wbits 4 -> 3", "seed 0 -> 7"]`` for the options whose values differ; an option
    newer than the record counts as unchanged while it is unset. ``marked``: the keys marked as
    option names for a :class:`ConfigError`."""
    names = [
        key
        for key in {**saved, **current}
        if saved.get(key, UNSET) != current.get(key, UNSET)
        and not (key not in saved and current[key] is None)
        and not (key == PLACEMENT and _reference_then_auto(saved, current))
        and not _same_data(saved.get(key), current.get(key))
    ]
    parts = [
        f"{f'«{key}»' if marked else key} {_short(saved.get(key, UNSET))} -> "
        f"{_short(current.get(key, UNSET))}"
        for key in names[:shown]
    ]
    if len(names) > shown:
        parts.append(f"and {len(names) - shown} more")
    return parts


def _same_data(saved: Any, current: Any) -> bool:
    """Two spellings of one dataset spec (``cifar10:../data`` and ``cifar10:/work/data``): the
    same data, so the same run. A run records a spec as it was typed."""
    return isinstance(saved, str) and isinstance(current, str) and same_dataset(saved, current)


def _short(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):  # a sha256 is told apart by its start
        return value[:12] + "..." if len(value) == 64 else value
    return json.dumps(value)


# --- records written by zsq before the method configs (keys were the CLI's flags) ------------
_V1_KEYS = {
    "--method": "method",
    "--model": "teacher.model",
    "--model-kwarg": "teacher.model_kwargs",
    "--weights (sha256)": "teacher.weights_sha256",
    "--num-classes": "teacher.num_classes",
    "--in-channels": "teacher.in_channels",
    "--normalize-mean": "teacher.normalize_mean",
    "--normalize-std": "teacher.normalize_std",
    "--image-size (input shape)": "image_shape",
    "--seed": "seed",
    "--eval-data": "eval_data",
    "--eval-limit": "eval_limit",
    "--wbits": "quant.wbits",
    "--abits": "quant.abits",
    "--symmetric": "quant.w_symmetric",
    "--act-placement": "quant.act_placement",
    "--layer": "quant.overrides",
    "mixed precision": "mixed",
    "world size": "world_size",
}


def upgrade(old: Mapping[str, Any]) -> dict[str, Any]:
    """A record of the flag-named kind as field paths (what this zsq records for that run)."""
    if "method" in old:  # already field paths
        return dict(old)
    method = old.get("--method")
    family = get_method(method).family if method else ""
    init = old.get("--init")
    options: dict[str, Any] = {}
    for key, value in old.items():
        if key in _V1_KEYS:
            options[_V1_KEYS[key]] = value
        elif key == "--per-tensor":
            options["quant.per_channel"] = not value
        elif key.startswith("quant "):
            options["quant." + key.removeprefix("quant ")] = value
        elif key == "--ait":
            options["method.ait"] = value
        elif key.startswith("--set "):
            options["method.recipe." + key.removeprefix("--set ")] = value
    calibration = "method" if family == "post-training" else "method.init" if init else None
    if family == "distillation":
        options["method.init"] = None
        if init:
            del options["method.init"]
            options["method.init.method"] = init
    if calibration is not None:
        options[f"{calibration}.calib"] = old.get("--calib")
        options[f"{calibration}.calib_size"] = old.get("--calib-size")
        for key, value in old.items():
            if key.startswith(("--calib-opt ", "--source-opt ")) and family == "post-training":
                options[f"{calibration}.calib_options.{key.split(' ', 1)[1]}"] = value
            elif key.startswith("--calib-opt "):
                options[f"{calibration}.calib_options.{key.split(' ', 1)[1]}"] = value
            elif key.startswith("--lapq-opt "):
                options[f"{calibration}.{key.removeprefix('--lapq-opt ')}"] = value
    if family == "distillation":
        for key, value in old.items():
            if key.startswith("--source-opt "):
                options["method.source_options." + key.removeprefix("--source-opt ")] = value
    return options
