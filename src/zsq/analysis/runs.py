"""What a finished ``zsq quantize`` run logged while it trained, as plain data (paper Figs. 1,
3-5a).

``metrics.jsonl`` holds one JSON object per epoch. The student's epochs carry the share of integer
weights that changed per step in each quantized layer (``crossing_fraction``, the epoch mean; the
paper's threshold crossings, Figs. 3c and 4), ``rho`` under gradient inundation, the KL to the
teacher on a fixed synthetic probe batch (``probe_kl``, Fig. 5a), the top-1 on evaluation data
when the run measured it, and, with ``analyze_every``, the CE/KL gradient cosine (Figs. 1, 5b)
and the inter-epoch cosine of the mean gradient (Fig. 3a). Epochs that lack a value (the
generator warm-up, epochs without evaluation) are left out of that value's series.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsq.errors import ZsqError
from zsq.methods import method_names
from zsq.run.finished import FinishedRun, open_run

# metrics.jsonl key -> RunMetrics series name, for the scalar series read as they are
SCALAR_KEYS = {
    "rho": "rho",
    "probe_kl": "probe_kl",
    "eval_top1": "eval_top1",
    "grad_cos_ce_kl": "grad_cos_ce_kl",
    "grad_cos_epoch": "grad_cos_epoch",
}


@dataclass(frozen=True)
class Series:
    """Values of one measurement at the epochs (1-based) that logged it."""

    epochs: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def append(self, epoch: int, value: float) -> None:
        self.epochs.append(epoch)
        self.values.append(value)

    def to_dict(self) -> dict[str, list]:
        return {"epochs": list(self.epochs), "values": list(self.values)}


@dataclass(frozen=True)
class RunMetrics:
    """A run's per-epoch measurements.

    ``crossing``: per layer, the share of its integer weights changed per step (epoch mean).
    ``no_change_layers``: how many layers changed no integer weight in the epoch (share 0).
    ``mean_crossing``: the per-layer shares averaged over layers (each layer counts once).
    The other series are read as logged (see the module docstring).
    """

    run_dir: str
    method: str
    epochs: list[int]
    layers: list[str]
    crossing: dict[str, Series]
    no_change_layers: Series
    mean_crossing: Series
    rho: Series
    probe_kl: Series
    eval_top1: Series
    grad_cos_ce_kl: Series
    grad_cos_epoch: Series

    def to_dict(self) -> dict[str, Any]:
        """Every number, JSON-ready (the ``zsq analyze run`` output)."""
        scalars = {name: getattr(self, name).to_dict() for name in SCALAR_KEYS.values()}
        return {
            "run": self.run_dir,
            "method": self.method,
            "epochs": list(self.epochs),
            "layers": list(self.layers),
            "crossing_fraction": {name: s.to_dict() for name, s in self.crossing.items()},
            "layers_with_no_change": self.no_change_layers.to_dict(),
            "mean_crossing_fraction": self.mean_crossing.to_dict(),
            **scalars,
        }


def finished_run(run_dir: str | Path) -> FinishedRun:
    """The run in ``run_dir``, checked to be a finished ``zsq quantize`` output folder (folders
    written before runs carried a ``.zsq-run`` marker are accepted by their report and student)."""
    return open_run(run_dir, marker=False)


def read_metrics_rows(run: FinishedRun) -> list[dict[str, Any]]:
    """The run's per-epoch records; an error for a post-training run (it trains nothing)."""
    path = run.layout.metrics
    registered = run.registered
    if not path.is_file() and registered is not None and registered.family != "distillation":
        raise ZsqError(
            f"{run.folder} has no {path.name}: method {run.method} is post-training (no "
            "training epochs to analyse); use a run of a distillation method "
            f"({', '.join(method_names('distillation'))})"
        )
    if not path.is_file():
        raise ZsqError(f"{run.folder} has no {path.name}; the run folder is incomplete")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ZsqError(f"{path} line {number} is not JSON; the file is damaged") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise ZsqError(f"{path} line {number} has no epoch number; the file is damaged")
        rows.append(row)
    if not rows:
        raise ZsqError(f"{path} is empty: the run logged no epoch")
    return rows


def read_run_metrics(run_dir: str | Path) -> RunMetrics:
    """The per-epoch measurements of the finished run in ``run_dir``."""
    run = finished_run(run_dir)
    rows = read_metrics_rows(run)
    layers: list[str] = []
    crossing: dict[str, Series] = {}
    no_change, mean_crossing = Series(), Series()
    scalars = {name: Series() for name in SCALAR_KEYS.values()}
    for row in rows:
        epoch = row["epoch"]
        shares = row.get("crossing_fraction") or {}
        for name, share in shares.items():
            if name not in crossing:
                layers.append(name)
                crossing[name] = Series()
            crossing[name].append(epoch, share)
        if shares:
            no_change.append(epoch, sum(1 for share in shares.values() if share == 0))
            mean_crossing.append(epoch, sum(shares.values()) / len(shares))
        for key, name in SCALAR_KEYS.items():
            if _is_number(row.get(key)):
                scalars[name].append(epoch, row[key])
    return RunMetrics(
        run_dir=str(run.folder),
        method=run.method,
        epochs=[row["epoch"] for row in rows],
        layers=layers,
        crossing=crossing,
        no_change_layers=no_change,
        mean_crossing=mean_crossing,
        **scalars,
    )


def _is_number(value: Any) -> bool:
    """A logged float (``None`` and NaN mean "not measured")."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not math.isnan(value)


def run_labels(runs: Sequence[RunMetrics]) -> list[str]:
    """A legend label per run: its method (gdfq, gdfq+ait, ...), or its folder name where two
    runs share a method; a number is added where folder names coincide as well."""
    methods = Counter(run.method for run in runs)
    labels = [
        run.method if methods[run.method] == 1 else Path(run.run_dir).name or run.run_dir
        for run in runs
    ]
    counts, seen = Counter(labels), Counter()
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(label if counts[label] == 1 else f"{label} ({seen[label]})")
    return unique
