"""Turn a folder of ``zsq quantize`` outputs into the markdown tables of docs/results.md.

    python benchmarks/summarize_runs.py runs/reproduction
    python benchmarks/summarize_runs.py --grid W4A4=runs/w4a4 W5A5=runs/w5a5

Expects ``ROOT/<dataset>/<row>/report.json`` (and ``metrics.jsonl`` for distillation rows), as
``benchmarks/reproduction_table.sh`` writes them. Prints an accuracy table, then per-layer shares
of integer weights changed per step (the paper's Fig. 3b/c and 4c/d) early and late in training
for each distillation row. ``--grid`` prints one table with a column per (dataset, bit width).

Two statistics, labelled apart: **final** is the student the run returns (what zsq reports);
**best epoch** is the highest per-epoch top-1 in ``metrics.jsonl``, the statistic the official
code reports, *selected on the test data* (shown only where more than one epoch was evaluated).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROW_NAMES = {  # in table order; the keys are reproduction_table.sh's row names
    "minmax": "minmax (Gaussian calibration)",
    "gdfq": "GDFQ (Table 2 baseline)",
    "gdfq+ait": "GDFQ+AIT (KL-only + GI)",
    "kl-only": "KL-only, no GI",
    "kl-high-lr": "KL-only, x100 lr",
    "gdfq+gi": "Baseline + GI",
    "ce+gi": "CE-only + GI",
    "qimera": "Qimera",
    "qimera+ait": "Qimera+AIT",
    "arc": "ARC",
    "arc+ait": "ARC+AIT",
    "gdfq-adam": "Baseline-Adam",
    "gdfq-rmsprop": "Baseline-RMSProp",
    "ait-adam": "GI-Adam (GDFQ+AIT)",
    "ait-rmsprop": "GI-RMSProp (GDFQ+AIT)",
    "ait-input": "GDFQ+AIT, --act-placement input",
    "ait-levels": "GDFQ+AIT, gi_count=levels",
    "ait-nearest": "GDFQ+AIT, gi_search=nearest-above",
}
ROW_ORDER = list(ROW_NAMES)


def load_rows(root: Path) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for report in sorted(root.glob("*/*/report.json")):
        dataset, row = report.parent.parent.name, report.parent.name
        table.setdefault(dataset, {})[row] = json.loads(report.read_text())
    return table


def best_epoch(run_dir: Path) -> str:
    """'top-1 (epoch N)' of the best evaluated epoch, or '-' with fewer than two evaluations."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return "-"
    metrics = [json.loads(line) for line in path.read_text().splitlines()]
    evaluated = [m for m in metrics if "eval_top1" in m]
    if len(evaluated) < 2:
        return "-"
    best = max(evaluated, key=lambda m: m["eval_top1"])
    return f"{best['eval_top1']:.2f} (epoch {best['epoch']})"


def placement(report: dict) -> str:
    return report.get("quant_spec", {}).get("act_placement", "-")


def accuracy_table(table: dict[str, dict[str, dict]], root: Path) -> str:
    lines = [
        "| data | row | final top-1 | gap to FP32 | best epoch (test-selected) | wall time (s) "
        "| recipe | placement | device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, rows in table.items():
        teacher = next(iter(rows.values()))["teacher_top1"]
        lines.append(f"| {dataset} | FP32 teacher | {teacher:.2f} | 0 | - | - | - | - | - |")
        for row in ROW_ORDER:
            if row not in rows:
                continue
            r = rows[row]
            recipe = r.get("recipe", {}).get("name", "-")
            gap = r["student_top1"] - teacher
            lines.append(
                f"| {dataset} | {ROW_NAMES[row]} | {r['student_top1']:.2f} | {gap:+.2f} | "
                f"{best_epoch(root / dataset / row)} | {r['seconds']:.0f} | {recipe} | "
                f"{placement(r)} | {r['device']} |"
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


def grid_table(roots: dict[str, Path]) -> str:
    """Rows = methods, columns = (dataset, bits); a cell is 'top-1 (wall s)'."""
    tables = {bits: load_rows(root) for bits, root in roots.items()}
    columns = [(d, b) for d in sorted({d for t in tables.values() for d in t}) for b in tables]
    lines = [
        "| row | " + " | ".join(f"{d} {b}" for d, b in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]

    def cell(dataset: str, bits: str, row: str) -> str:
        r = tables[bits].get(dataset, {}).get(row)
        return "-" if r is None else f"{r['student_top1']:.2f} ({r['seconds']:.0f} s)"

    teachers = []
    for d, b in columns:
        reports = list(tables[b].get(d, {}).values())
        teachers.append(f"{reports[0]['teacher_top1']:.2f}" if reports else "-")
    lines.append("| FP32 teacher | " + " | ".join(teachers) + " |")
    for row in ROW_ORDER:
        if any(row in tables[b].get(d, {}) for d, b in columns):
            cells = [cell(d, b, row) for d, b in columns]
            lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, nargs="?")
    parser.add_argument("--epochs", default="3,8,13,16", help="epochs for the crossing tables")
    parser.add_argument("--grid", nargs="+", metavar="BITS=ROOT", help="one table over roots")
    args = parser.parse_args()
    if args.grid:
        roots = dict(item.split("=", 1) for item in args.grid)
        print(grid_table({bits: Path(root) for bits, root in roots.items()}))
        return
    if args.root is None:
        parser.error("give a ROOT folder or --grid BITS=ROOT ...")
    table = load_rows(args.root)
    print(accuracy_table(table, args.root))
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
