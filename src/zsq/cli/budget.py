"""``zsq budget``: the cost model of a teacher, per layer and at uniform widths."""

from __future__ import annotations

import argparse
from typing import Any

from zsq.cli._common import add_model_args, load_teacher


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "budget", help="per-layer parameters, MACs, bytes and BOPs; totals at uniform 2..8 bits"
    )
    add_model_args(p)
    p.add_argument("--abits", default="4", help="activation bits for the BOPs columns (4)")
    p.add_argument("--budget", help="also show what this budget allows, e.g. wbits=3.5")
    p.add_argument("--quiet", action="store_true", help="no info logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zsq.mixed.allocate import cost_problem
    from zsq.mixed.cost import cost_table, layer_costs, parse_budget
    from zsq.quant import parse_bits

    budget = parse_budget(args.budget) if args.budget else None  # a bad one: before any work
    teacher, meta, shape = load_teacher(args)
    abits = parse_bits(args.abits)
    costs = layer_costs(teacher, shape)
    print(f"{meta.model} at input {shape}, activations {abits or 32} bits\n")
    print(cost_table(costs, abits))
    if budget is not None:
        _, _, limit = cost_problem(teacher, shape, budget, (2, 3, 4, 5, 6, 8), abits)
        print(f"\nbudget {budget.text}: {limit:.6g} in layer-cost units ({budget.kind})")
    return 0
