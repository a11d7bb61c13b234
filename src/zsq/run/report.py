"""A run's report: what ran, on what, how well and how long (``report.json``, ``report.md``)."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from typing import Any

import torch

from zsq._version import __version__
from zsq.export.sizes import size_report
from zsq.layout import RunLayout
from zsq.mixed.allocate import Allocation
from zsq.quant import QuantSpec
from zsq.quant.placement import placement_summary

MIXED = "mixed"  # the report's wbits/abits where an allocation chose the widths per layer


def build_report(
    *,
    method: str,
    quant: QuantSpec,
    model: str | None,
    weights: str | None,
    eval_data: str | None,
    scores: dict[str, Any],
    seed: int,
    device: str,
    world: dict[str, Any],
    image_shape: Sequence[int],
    eval_transform: str | None,
    outcome: dict[str, Any],
    student: torch.nn.Module,
    allocation: Allocation | None,
    sessions: list[float],
) -> dict[str, Any]:
    """The report; ``outcome`` is the method's part, ``scores`` the evaluation's, ``sessions``
    the seconds of every session of the run (earlier, interrupted ones first)."""
    report: dict[str, Any] = {
        "method": method,
        "wbits": quant.wbits,
        "abits": quant.abits,
        "model": model,
        "weights": weights,
        "eval_data": eval_data,
        **scores,
        "seed": seed,
        "device": device,
        **world,
        "calibration": "none",
        "real_data": False,
        "quant_spec": quant.to_dict(),
        "image_shape": list(image_shape),
        "eval_transform": eval_transform,
        "zsq_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    report.update(outcome)
    sizes = size_report(student)
    if allocation is not None:
        report.update(mixed_bits(allocation))
        report["allocation"] = allocation_report(allocation, sizes)
    report["sizes"] = sizes
    report["sessions"] = list(sessions)
    report["seconds"] = round(sum(sessions), 2)
    return json.loads(json.dumps(report))  # as report.json holds it (tuples become lists)


def mixed_bits(allocation: Allocation) -> dict[str, str]:
    """The report's top-level widths under an allocation: the uniform widths were only the
    defaults it overrode, so they would misstate the student (per layer: ``allocation``)."""
    return {"wbits": MIXED, **({"abits": MIXED} if allocation.act_sites else {})}


def allocation_report(allocation: Allocation, sizes: dict[str, Any]) -> dict[str, Any]:
    """What the report says about the bits: per layer, their parameter-weighted mean (the unit
    of a ``wbits=`` budget), the cost beside the budget, the time."""
    params = [sizes["layers"][name]["params"] for name in allocation.layers]
    return {
        "allocator": allocation.allocator,
        "budget": allocation.budget,
        "cost": allocation.cost,
        "limit": allocation.limit,
        "within_budget": allocation.cost <= allocation.limit * (1 + 1e-9),
        "mean_wbits": round(allocation.mean_wbits(params), 4),
        "wbits": dict(zip(allocation.layers, allocation.wbits, strict=True)),
        "abits": (
            dict(zip(allocation.act_sites, allocation.act_bits, strict=True))
            if allocation.act_sites
            else allocation.abits
        ),
        "seconds": allocation.seconds,
        "samples": allocation.samples,
        "file": RunLayout.BITS,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _bits_text(report: dict[str, Any]) -> str:
    """``W4A4``; under an allocation, the budget, its allocator and the mean weight bits."""
    allocation = report.get("allocation")
    if allocation is None:
        return f"W{report['wbits'] or 32}A{report['abits'] or 32}"
    acts = "mixed" if report["abits"] == MIXED else report["abits"] or 32
    return (
        f"mixed (budget {allocation['budget']}, {allocation['allocator']}): "
        f"mean W{allocation['mean_wbits']:.2f} A{acts}"
    )


def _placement_text(report: dict[str, Any]) -> str:
    placement = report.get("quant_spec", {}).get("act_placement", "reference")
    places = report.get("input_placement")
    return f"{placement}: {placement_summary(places)}" if places else placement


def report_markdown(report: dict[str, Any]) -> str:
    rows = [
        ("method", report["method"]),
        ("bits", _bits_text(report)),
        ("model", report["model"]),
        ("weights", report["weights"]),
        ("eval data", report["eval_data"]),
        ("images evaluated", report["n_eval"]),
        (
            "teacher top-1 / top-5",
            f"{_fmt(report['teacher_top1'])} / {_fmt(report['teacher_top5'])}"
            + (" (cached)" if str(report.get("teacher_score", "")).endswith("(cache)") else ""),
        ),
        (
            "student top-1 / top-5",
            f"{_fmt(report['student_top1'])} / {_fmt(report['student_top5'])}",
        ),
        ("activation placement", _placement_text(report)),
        ("calibration", report["calibration"]),
        ("real data used", "YES (not zero-shot)" if report.get("real_data") else "no"),
        ("seed", report["seed"]),
        ("device", report["device"]),
        ("wall time (s)", report["seconds"]),
    ]
    lines = ["# zsq quantize report", "", "| field | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in rows]
    return "\n".join(lines) + "\n"
