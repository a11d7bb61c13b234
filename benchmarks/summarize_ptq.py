"""Markdown tables from the runs of benchmarks/ptq_methods.sh.

    python benchmarks/summarize_ptq.py runs/ptq-methods

One table per teacher: a row per method, a column per bit width, each cell "top-1 (seconds)";
rows on real calibration data are marked. Then LAPQ's phases for every LAPQ run at W4A4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = {
    "minmax": "min/max, Gaussian calibration",
    "zeroq": "ZeroQ (min/max on 512 distilled images)",
    "lapq-real": "LAPQ, 512 real images **(real data)**",
    "lapq-zeroq": "LAPQ on ZeroQ images",
    "lapq-gdfq": "LAPQ on GDFQ images",
    "lapq-lw": "LAPQ layer-wise only, p=2 **(real data)**",
    "lapq-qa": "LAPQ layer-wise + quadratic p **(real data)**",
    "lapq-zeroq-lw": "LAPQ layer-wise only on ZeroQ images",
    "lapq-zeroq-qa": "LAPQ layer-wise + quadratic p on ZeroQ images",
    "lapq-nobc": "LAPQ without bias correction **(real data)**",
    "lapq-paper": "LAPQ, --lapq-layers paper **(real data)**",
    "ait": "GDFQ+AIT (short)",
    "ait-init": "GDFQ+AIT (short), --init lapq (ZeroQ images)",
    "ait-init-qa": "GDFQ+AIT (short), --init lapq --lapq-opt stages=lw+qa (ZeroQ images)",
}


def load(root: Path) -> dict[str, dict[str, dict[str, dict]]]:
    runs: dict[str, dict[str, dict[str, dict]]] = {}
    for report in sorted(root.glob("*/w*a*/*/report.json")):
        row, bits, teacher = report.parent.name, report.parent.parent.name, report.parents[2].name
        runs.setdefault(teacher, {}).setdefault(row, {})[bits] = json.loads(report.read_text())
    return runs


def cell(report: dict | None) -> str:
    if report is None:
        return "-"
    return f"{report['student_top1']:.2f} ({report['seconds']:.0f} s)"


def main(root: Path) -> None:
    for teacher, rows in load(root).items():
        bits = sorted({b for r in rows.values() for b in r}, key=lambda b: (b[1], b[3]))
        first = next(iter(next(iter(rows.values())).values()))
        print(
            f"\n#### {teacher} (teacher top-1 {first['teacher_top1']:.2f}, "
            f"{first['n_eval']} test images)\n"
        )
        print("| method | " + " | ".join(b.upper() for b in bits) + " |")
        print("|---|" + "---|" * len(bits))
        for row, label in ROWS.items():
            if row in rows:
                print(f"| {label} | " + " | ".join(cell(rows[row].get(b)) for b in bits) + " |")
        print(
            "\nLAPQ phases at W4A4 (calibration loss; p; Powell evaluations; seconds per phase):\n"
        )
        print("| run | layer-wise (p=2) | quadratic p (p*) | Powell | evaluations | seconds |")
        print("|---|---|---|---|---|---|")
        for row, per_bits in rows.items():
            lapq = per_bits.get("w4a4", {}).get("lapq")
            if lapq is None:
                continue
            qa = lapq.get("loss_quadratic")
            qa_text = f"{qa:.4f} ({lapq['p']:.2f})" if qa is not None else "-"
            powell = lapq.get("loss_powell")
            seconds = ", ".join(f"{k} {v:.0f}" for k, v in lapq["seconds"].items())
            print(
                f"| {row} | {lapq['loss_layerwise']:.4f} | {qa_text} | "
                f"{'-' if powell is None else f'{powell:.4f}'} | "
                f"{lapq.get('powell_evaluations', '-')} | {seconds} |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ptq-methods"))
