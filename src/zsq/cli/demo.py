"""``zsq demo``: the whole story in minutes, with no files and no network."""

from __future__ import annotations

import argparse
from typing import Any

from zsq.cli._common import add_common


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train a digits CNN and quantize it with min/max and GDFQ with and without AIT (about "
        "2 minutes on 2 CPU cores; no files, no network)",
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zsq.demo import run_demo

    print(run_demo(seed=args.seed, device=args.device, progress=not args.quiet))
    return 0
