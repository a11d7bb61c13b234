"""Markdown tables and the top-1-against-size plot of benchmarks/mixed_table.sh.

python benchmarks/summarize_mixed.py runs/mixed-table [--plot runs/mixed-table/size.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = ("uniform", "sensitivity", "hessian", "constrained", "penalty")
METHODS = {"minmax": "min/max", "ait": "GDFQ+AIT (short)"}


def load(root: Path) -> dict[tuple[str, int, str, str], dict]:
    """(dataset, wbits budget, method, row) -> report."""
    runs = {}
    for report in root.glob("*/w*/*/report.json"):
        data, bits, name = report.parts[-4], int(report.parts[-3][1:]), report.parts[-2]
        method, _, row = name.partition("-")
        runs[data, bits, method, row] = json.loads(report.read_text())
    return runs


def _cell(report: dict | None) -> str:
    if report is None:
        return "-"
    text = f"{report['student_top1']:.2f} ({report['seconds']:.0f} s)"
    allocation = report.get("allocation")
    if allocation:
        text += f", alloc {allocation['seconds']:.0f} s"
    return text


def table(runs: dict, data: str, budgets: list[int]) -> str:
    columns = [(b, m) for b in budgets for m in METHODS]
    head = " | ".join(f"W{b} budget, {METHODS[m]}" for b, m in columns)
    lines = [f"| bits | {head} |", "|---" * (len(columns) + 1) + "|"]
    for row in ROWS:
        cells = [_cell(runs.get((data, b, m, row))) for b, m in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def widths(runs: dict, data: str, bits: int) -> str:
    lines = []
    for row in ROWS[1:]:
        report = runs.get((data, bits, "minmax", row))
        if report and report.get("allocation"):
            values = list(report["allocation"]["wbits"].values())
            lines.append(f"- {row}: {values}")
    return "\n".join(lines)


def bit_size_kb(report: dict) -> float:
    """Weights at exactly their bits (sum of params x wbits / 8), kB: the size a bit-packed
    format stores; zsq's integer export rounds codes up to 4 or 8 bits (``sizes.packed``)."""
    layers = report["sizes"]["layers"].values()
    return sum(v["params"] * (v["wbits"] or 32) for v in layers) / 8 / 1e3


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({key[0] for key in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datasets, strict=True):
        uniform = sorted(
            (bit_size_kb(r), r["student_top1"], b)
            for (d, b, m, row), r in runs.items()
            if d == data and m == "minmax" and row == "uniform"
        )
        if uniform:
            ax.plot([u[0] for u in uniform], [u[1] for u in uniform], "k.-", label="uniform W2..8")
            for size, top1, b in uniform:
                ax.annotate(f"W{b}", (size, top1), textcoords="offset points", xytext=(3, -12))
        for row, marker in zip(ROWS[1:], "os^v", strict=True):
            for method, fill in (("minmax", "none"), ("ait", None)):
                points = [
                    (bit_size_kb(r), r["student_top1"])
                    for (d, _, m, rr), r in runs.items()
                    if d == data and m == method and rr == row
                ]
                if points:
                    ax.scatter(
                        *zip(*points, strict=True),
                        marker=marker,
                        facecolors=fill,
                        edgecolors="C" + str(ROWS.index(row)),
                        color=None if fill else "C" + str(ROWS.index(row)),
                        label=f"{row}, {METHODS[method]}",
                    )
        ax.set_title(f"ResNet-20 on {data}, activations 4 bits")
        ax.set_xlabel("weights at their bit widths (kB, sum of params x bits / 8)")
        ax.set_ylabel("top-1 on the test set (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--plot", type=Path, help="write the size plot here (PNG)")
    args = parser.parse_args()
    runs = load(args.root)
    for data in sorted({key[0] for key in runs}):
        budgets = sorted({key[1] for key in runs if key[0] == data and key[3] != "uniform"})
        print(f"\n#### {data}\n")
        print(table(runs, data, budgets or [4]))
        for bits in budgets:
            print(f"\nWidths at the W{bits} budget (layer order):\n{widths(runs, data, bits)}")
    if args.plot:
        plot(runs, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
