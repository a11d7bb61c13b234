"""The exact bit allocation: a multiple-choice knapsack solved as a 0/1 integer program.

Each layer takes exactly one of its candidate widths; the summed score (a sensitivity, a
Hessian-weighted error) is minimised while the summed cost stays within the budget. scipy's
``milp`` (HiGHS, branch and bound) solves it to optimality with the gap set to zero; the answer
is re-checked with plain Python sums, so floating-point rounding inside the solver can never
return an allocation over the budget. ``repair`` makes any discrete choice (a rounded
differentiable search, a solver's near miss) fit the budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from zsq.errors import ZsqError

log = logging.getLogger(__name__)

Matrix = Sequence[Sequence[float]]

REL_TOL = 1e-9  # slack given to the solver's budget row, relative to the costs' magnitude


def cheapest_cost(costs: Matrix) -> float:
    """The smallest achievable total: every layer at its cheapest choice (summed in order)."""
    return sum(min(row) for row in _matrix(costs, "costs"))


def solve_allocation(scores: Matrix, costs: Matrix, limit: float) -> list[int]:
    """One choice index per layer minimising the summed score with summed cost <= ``limit``.

    Among allocations with the same best score the cheapest is returned (a second, lexicographic
    solve), so ties are broken the same way on every run.
    """
    s, c = _matrix(scores, "scores"), _matrix(costs, "costs")
    _check_same_shape(s, c, "scores")
    limit = _limit(limit)
    _check_feasible(c, limit)
    if not c:
        return []
    choice = _milp_choice(np.array(s), np.array(c), limit)
    if choice is None:
        log.warning("milp found no allocation; repairing the best-score choice instead")
        choice = [int(np.argmin(row)) for row in s]
    if _total(c, choice) > limit:
        log.info("the solver's allocation is over the budget by rounding; repairing it")
        choice = repair(choice, c, limit, preference=s)
    return choice


def repair(
    choice: Sequence[int],
    costs: Matrix,
    limit: float,
    preference: Matrix | None = None,
) -> list[int]:
    """``choice`` moved, one layer at a time, to cheaper choices until it fits ``limit``.

    Each move is the one with the smallest increase in ``preference`` (lower is better) per unit
    of cost saved; with no preference that is the largest saving. Ties go to the larger saving,
    then the earlier layer, then the lower index. A choice within the budget is returned as is.
    """
    c = _matrix(costs, "costs")
    pref = [[0.0] * len(row) for row in c] if preference is None else _matrix(preference, "pref")
    _check_same_shape(pref, c, "preference")
    limit = _limit(limit)
    current = _check_choice(choice, c)
    if _total(c, current) <= limit:
        return current
    _check_feasible(c, limit)
    while _total(c, current) > limit:
        layer, option = _best_move(current, c, pref)
        current[layer] = option
    return current


def _best_move(current: list[int], costs: Matrix, pref: Matrix) -> tuple[int, int]:
    """(layer, option) of the cheapest-in-preference saving; one exists while over budget."""
    best_key, best = None, None
    for layer, (row, prow) in enumerate(zip(costs, pref, strict=True)):
        now = current[layer]
        for option, cost in enumerate(row):
            saving = row[now] - cost
            if saving <= 0:
                continue
            key = ((prow[option] - prow[now]) / saving, -saving, layer, option)
            if best_key is None or key < best_key:
                best_key, best = key, (layer, option)
    if best is None:  # unreachable after _check_feasible: every layer would be at its cheapest
        raise ZsqError("no cheaper choice is left to meet the budget")
    return best


def _milp_choice(scores: np.ndarray, costs: np.ndarray, limit: float) -> list[int] | None:
    """Best score, then cheapest among the best, by two 0/1 programs; None if HiGHS fails.

    Both rows are shifted by each layer's minimum (one choice per layer, so the optimum does not
    move) and scaled to [0, 1], keeping HiGHS's absolute tolerances meaningful whatever the units
    (KL values near 1e-4, BOPs near 1e9).
    """
    n_layers, n_choices = scores.shape
    score = _unit_rows(scores)
    cost_min = costs.min(axis=1, keepdims=True)
    extra = costs - cost_min
    cost_scale = float(extra.max()) or 1.0
    extra /= cost_scale
    magnitude = float(np.abs(costs).max(axis=1).sum()) + abs(limit)
    slack = (limit - float(cost_min.sum())) / cost_scale + REL_TOL * magnitude / cost_scale
    one_each = np.kron(np.eye(n_layers), np.ones((1, n_choices)))
    rows = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(extra.reshape(1, -1), -np.inf, slack),
    ]
    first = _solve_01(score.ravel(), rows)
    if first is None:
        return None
    chosen = _argmax(first, n_choices)
    best = float(score.ravel() @ first)
    tie = LinearConstraint(score.reshape(1, -1), -np.inf, best + REL_TOL * max(1.0, best))
    second = _solve_01(extra.ravel(), [*rows, tie])
    if second is not None:
        cheaper = _argmax(second, n_choices)
        if _total(scores, cheaper) <= _total(scores, chosen) and _total(costs, cheaper) <= min(
            _total(costs, chosen), limit
        ):
            chosen = cheaper
    return chosen


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """File descriptor 1 to /dev/null for the block (C code bypasses ``sys.stdout``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_01(objective: np.ndarray, constraints: list[LinearConstraint]) -> np.ndarray | None:
    with _stdout_silenced():  # HiGHS writes some diagnostics straight to fd 1 (--json output)
        result = milp(
            objective,
            constraints=constraints,
            integrality=np.ones_like(objective),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "disp": False},
        )
    if result.status != 0 or result.x is None:
        log.debug("milp status %s: %s", result.status, result.message)
        return None
    return result.x


def _unit_rows(values: np.ndarray) -> np.ndarray:
    shifted = values - values.min(axis=1, keepdims=True)
    return shifted / (float(shifted.max()) or 1.0)


def _argmax(x: np.ndarray, n_choices: int) -> list[int]:
    return [int(i) for i in x.reshape(-1, n_choices).argmax(axis=1)]


def _total(values: Matrix | np.ndarray, choice: Sequence[int]) -> float:
    """Summed in layer order with Python floats, the sum every budget check uses."""
    return sum(float(row[k]) for row, k in zip(values, choice, strict=True))


def _matrix(values: Matrix, what: str) -> list[list[float]]:
    """A rectangular table of finite floats (one row per layer), else a ZsqError."""
    rows = [[float(v) for v in row] for row in values]
    widths = {len(row) for row in rows}
    if 0 in widths or len(widths) > 1:
        raise ZsqError(
            f"{what} must have the same number (>= 1) of choices for every layer, got row "
            f"lengths {sorted(widths)}"
        )
    if not all(np.isfinite(row).all() for row in rows):
        raise ZsqError(f"{what} contain a NaN or infinite value; every entry must be finite")
    return rows


def _check_same_shape(a: list[list[float]], costs: list[list[float]], what: str) -> None:
    if len(a) != len(costs) or (a and len(a[0]) != len(costs[0])):
        shape_a = (len(a), len(a[0]) if a else 0)
        shape_c = (len(costs), len(costs[0]) if costs else 0)
        raise ZsqError(
            f"{what} are {shape_a[0]}x{shape_a[1]} but costs {shape_c[0]}x{shape_c[1]} "
            "(layers x choices); give one entry per layer and choice in both"
        )


def _check_choice(choice: Sequence[int], costs: list[list[float]]) -> list[int]:
    picked = [int(k) for k in choice]
    if len(picked) != len(costs) or any(
        not 0 <= k < len(row) for k, row in zip(picked, costs, strict=True)
    ):
        raise ZsqError(
            f"choice {picked} must give one index per layer ({len(costs)}) within "
            f"0..{len(costs[0]) - 1 if costs else 0}"
        )
    return picked


def _limit(limit: float) -> float:
    value = float(limit)
    if not np.isfinite(value):
        raise ZsqError(f"budget limit {limit!r} must be a finite number")
    return value


def _check_feasible(costs: list[list[float]], limit: float) -> None:
    smallest = cheapest_cost(costs)
    if smallest > limit:
        raise ZsqError(
            f"budget {limit:.12g} is below the smallest achievable cost {smallest:.12g} "
            "(every layer at its cheapest width)"
        )
