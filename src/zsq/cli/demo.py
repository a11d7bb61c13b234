"""``zsq demo``: the problem and each method's answer in under a minute, no files needed."""

from __future__ import annotations

import argparse
from typing import Any

from zsq.cli._common import add_common


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train a digits CNN and quantize it at W2A2 with min/max, GDFQ, GDFQ+AIT and Genie "
        "(about 40 seconds on 2 CPU cores; no files, no network); prints the table and writes "
        "a PNG of accuracy against seconds",
    )
    p.add_argument(
        "--plot", default="zsq-demo.png", metavar="PNG", help="where the PNG goes (zsq-demo.png)"
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zsq.analysis.plots import written_by_zsq
    from zsq.demo import run_demo, save_plot
    from zsq.errors import ZsqError

    plot = Path(args.plot).expanduser()
    folder = plot.resolve().parent
    if not folder.is_dir():  # before the minutes of work
        raise ZsqError(f"--plot {args.plot}: folder {folder} does not exist; create it first")
    if plot.is_symlink() or (plot.exists() and not written_by_zsq(plot)):
        raise ZsqError(
            f"--plot {args.plot} exists and is not a PNG zsq wrote; the demo replaces only its "
            "own plot: give another --plot"
        )
    result = run_demo(seed=args.seed, device=args.device, progress=not args.quiet)
    print(result.table())
    print()
    print(result.closing_line())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot: skipped (matplotlib is not installed: pip install 'zsq[plots]')")
        return 0
    print(f"plot: {save_plot(result, plot)}")
    return 0
