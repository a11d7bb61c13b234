"""Turn a folder of ``zsq quantize`` outputs into the markdown tables of docs/results.md.

    python benchmarks/summarize_runs.py runs/issue3

Expects ``ROOT/<dataset>/<row>/report.json`` (and ``metrics.jsonl`` for distillation rows).
Prints an accuracy table, then per-layer shares of integer weights changed per step (the paper's
Fig. 3b/c and 4c/d) early and late in training for each distillation row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROW_ORDER = [
    "minmax",
    "gdfq",
    "gdfq+ait",
    "kl-only",
    "qimera",
    "qimera+ait",
    "arc",
    "arc+ait",
    "ait-adam",
    "ait-rmsprop",
]
ROW_NAMES = {
    "minmax": "minmax (Gaussian calibration)",
    "gdfq": "GDFQ",
    "gdfq+ait": "GDFQ+AIT",
    "kl-only": "KL-only, no GI",
    "qimera": "Qimera",
    "qimera+ait": "Qimera+AIT",
    "arc": "ARC",
    "arc+ait": "ARC+AIT",
    "ait-adam": "GDFQ+AIT, Adam",
    "ait-rmsprop": "GDFQ+AIT, RMSProp",
}


def load_rows(root: Path) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for report in sorted(root.glob("*/*/report.json")):
        dataset, row = report.parent.parent.name, report.parent.name
        table.setdefault(dataset, {})[row] = json.loads(report.read_text())
    return table


def accuracy_table(table: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| data | row | top-1 | gap to FP32 | wall time (s) | recipe | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, rows in table.items():
        teacher = next(iter(rows.values()))["teacher_top1"]
        lines.append(f"| {dataset} | FP32 teacher | {teacher:.2f} | 0 | - | - | - |")
        for row in ROW_ORDER:
            if row not in rows:
                continue
            r = rows[row]
            recipe = r.get("recipe", {}).get("name", "-")
            gap = r["student_top1"] - teacher
            lines.append(
                f"| {dataset} | {ROW_NAMES[row]} | {r['student_top1']:.2f} | {gap:+.2f} | "
                f"{r['seconds']:.0f} | {recipe} | {r['device']} |"
            )
    return "\n".join(lines)


def crossing_table(run_dir: Path, epochs: list[int]) -> str:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_epoch = {m["epoch"]: m for m in metrics if "crossing_fraction" in m}
    chosen = [e for e in epochs if e in by_epoch]
    layers = list(by_epoch[chosen[0]]["crossing_fraction"])
    header = "| layer | " + " | ".join(f"epoch {e}" for e in chosen) + " |"
    lines = [header, "|---|" + "---|" * len(chosen)]
    for layer in layers:
        cells = [f"{by_epoch[e]['crossing_fraction'][layer]:.1e}" for e in chosen]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    zero = [sum(1 for v in by_epoch[e]["crossing_fraction"].values() if v == 0) for e in chosen]
    lines.append("| layers with no change | " + " | ".join(str(z) for z in zero) + " |")
    if "rho" in by_epoch[chosen[-1]]:
        lines.append("| rho | " + " | ".join(f"{by_epoch[e]['rho']:.0e}" for e in chosen) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--epochs", default="3,8,13,16", help="epochs for the crossing tables")
    args = parser.parse_args()
    table = load_rows(args.root)
    print(accuracy_table(table))
    epochs = [int(e) for e in args.epochs.split(",")]
    for dataset, rows in table.items():
        for row in ("kl-only", "gdfq+ait", "gdfq"):
            if row in rows and (args.root / dataset / row / "metrics.jsonl").exists():
                print(
                    f"\n**{dataset}, {ROW_NAMES[row]}**: mean share of integer weights changed "
                    "per step, by epoch\n"
                )
                print(crossing_table(args.root / dataset / row, epochs))


if __name__ == "__main__":
    main()
