"""Markdown tables from the runs of benchmarks/reconstruction_table.sh.

    python benchmarks/summarize_reconstruction.py runs/reconstruction

One table per teacher: a row per method, a column per bit width, each cell "top-1 (gap to FP32;
minutes)", with each row's convention and whether it used real data. Then, per reconstruction
run, the mean reconstruction loss per unit before (the initial grid, nearest rounding) and
after, and where the time went.
"""

from __future__ import annotations

import sys
from pathlib import Path

from summarize_ptq import load  # the same runs/<teacher>/w<W>a<A>/<row> layout

# row -> (label, convention)
ROWS = {
    "minmax": ("min/max, Gaussian calibration", "all"),
    "lapq-gdfq": ("LAPQ on 512 GDFQ images", "all"),
    "ait": ("GDFQ+AIT `short`", "all"),
    "genie": ("Genie (Genie-D + reconstruction), `short`", "all"),
    "genie-paperconv": ("Genie, `short`", "paper"),
    "recon-gdfq": ("reconstruction on 1,024 GDFQ images", "all"),
    "recon-zeroq": ("reconstruction on 1,024 ZeroQ images", "all"),
    "recon-real": ("reconstruction on 1,024 real images **(real data)**", "all"),
    "genie-ait": ("Genie `short`, then GDFQ+AIT `short`", "all"),
    "genie-paper": ("Genie, `paper`", "all"),
}


def cell(report: dict | None) -> str:
    if report is None:
        return "-"
    gap = report["student_top1"] - report["teacher_top1"]
    minutes = f"{report['seconds'] / 60:.1f} min"
    if "1 threads" in report.get("device", ""):  # run on one thread, beside another job
        minutes += ", 1 thread"
    return f"{report['student_top1']:.2f} ({gap:+.2f}; {minutes})"


def genie_of(report: dict) -> dict | None:
    return report.get("genie") or (report.get("init") or {}).get("genie")


def losses(report: dict) -> str:
    genie = genie_of(report)
    if not genie or genie.get("mean_loss_before") is None:
        return "-"
    return f"{genie['mean_loss_before']:.4f} -> {genie['mean_loss_after']:.4f}"


def main(root: Path) -> None:
    for teacher, rows in load(root).items():
        bits = sorted({b for r in rows.values() for b in r}, key=lambda b: (-int(b[1]), -int(b[3])))
        first = next(iter(next(iter(rows.values())).values()))
        print(
            f"\n#### {teacher} (FP32 top-1 {first['teacher_top1']:.2f}, {first['n_eval']} test "
            "images; cell: top-1 (student - FP32 as a negative gap; minutes))\n"
        )
        header = " | ".join(b.upper() for b in bits)
        print(f"| method | convention | real data | {header} |")
        print("|---|---|---|" + "---|" * len(bits))
        for row, (label, convention) in ROWS.items():
            if row not in rows:
                continue
            real = any(r.get("real_data") for r in rows[row].values())
            cells = " | ".join(cell(rows[row].get(b)) for b in bits)
            print(f"| {label} | {convention} | {'yes' if real else 'no'} | {cells} |")
        print("\nMean reconstruction loss per unit, before -> after (sum over features of the "
              "squared error, mean over images):\n")  # fmt: skip
        print(f"| row | {header} |")
        print("|---|" + "---|" * len(bits))
        for row in ROWS:
            if row in rows and any(genie_of(r) for r in rows[row].values()):
                cells = " | ".join(losses(rows[row][b]) if b in rows[row] else "-" for b in bits)
                print(f"| {row} | {cells} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/reconstruction"))
