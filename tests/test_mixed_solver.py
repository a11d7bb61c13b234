import itertools
import random

import pytest

from zsq.errors import ZsqError
from zsq.mixed.solver import cheapest_cost, repair, solve_allocation


def total(values, choice):
    return sum(row[k] for row, k in zip(values, choice, strict=True))


def brute_force(scores, costs, limit):
    """Best summed score within the limit; ties to the lower summed cost."""
    feasible = [
        choice
        for choice in itertools.product(*(range(len(row)) for row in costs))
        if total(costs, choice) <= limit
    ]
    return list(min(feasible, key=lambda c: (total(scores, c), total(costs, c))))


def random_problem(seed, layers=4, choices=3, integer=False, scale=1.0):
    rng = random.Random(seed)
    draw = (lambda: rng.randint(0, 4)) if integer else rng.random
    scores = [[draw() for _ in range(choices)] for _ in range(layers)]
    costs = [[scale * (draw() + 0.1) for _ in range(choices)] for _ in range(layers)]
    return rng, scores, costs


def limits_for(rng, costs):
    """Limits across the feasible range, two of them exactly one allocation's cost."""
    all_costs = sorted(total(costs, c) for c in itertools.product(range(3), repeat=len(costs)))
    exact = [total(costs, [rng.randrange(3) for _ in costs]) for _ in range(2)]
    return exact + [all_costs[0], all_costs[len(all_costs) // 3], all_costs[-1], all_costs[-1] * 2]


@pytest.mark.parametrize("seed", range(6))
def test_solve_equals_brute_force(seed):
    rng, scores, costs = random_problem(seed)
    for limit in limits_for(rng, costs):
        choice = solve_allocation(scores, costs, limit)
        assert choice == brute_force(scores, costs, limit), limit
        assert total(costs, choice) <= limit
        assert all(isinstance(k, int) for k in choice)


@pytest.mark.parametrize("seed", range(4))
def test_solve_with_ties_prefers_the_cheapest_best(seed):
    """Integer scores and costs tie often: the best score, then the lowest cost, every time."""
    rng, scores, costs = random_problem(100 + seed, integer=True)
    for limit in limits_for(rng, costs):
        choice = solve_allocation(scores, costs, limit)
        best = brute_force(scores, costs, limit)
        assert (total(scores, choice), total(costs, choice)) == (
            total(scores, best),
            total(costs, best),
        )
        assert solve_allocation(scores, costs, limit) == choice  # deterministic


def test_solve_at_large_magnitudes_meets_an_exact_limit():
    """BOP-sized costs and KL-sized scores: the exact limit holds with plain Python sums."""
    for seed in range(3):
        rng, scores, costs = random_problem(200 + seed, layers=5, scale=3.7e9)
        scores = [[s * 1e-5 for s in row] for row in scores]
        target = [rng.randrange(3) for _ in costs]
        limit = total(costs, target)
        choice = solve_allocation(scores, costs, limit)
        assert total(costs, choice) <= limit
        assert total(scores, choice) == pytest.approx(
            total(scores, brute_force(scores, costs, limit))
        )


def test_infeasible_budget_names_the_smallest_cost():
    costs = [[3, 5, 9], [2, 4, 8]]
    assert cheapest_cost(costs) == 5
    with pytest.raises(ZsqError) as info:
        solve_allocation([[0, 0, 0], [0, 0, 0]], costs, 4.5)
    message = str(info.value)
    assert "\n" not in message
    assert "smallest achievable cost 5 (every layer at its cheapest width)" in message
    assert "budget 4.5" in message
    assert solve_allocation([[3, 2, 1], [3, 2, 1]], costs, 5) == [0, 0]  # exactly the cheapest


def test_solver_answer_over_the_budget_is_repaired(monkeypatch):
    """The safety net: a solver answer over the limit (rounding) is repaired, never returned."""
    from zsq.mixed import solver

    costs = [[1.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    scores = [[3.0, 2.0, 0.0], [3.0, 1.0, 0.0]]
    monkeypatch.setattr(solver, "_milp_choice", lambda *_: [2, 2])  # cost 9
    # repair by score per unit saved: layer 1 (5 -> 3, +1 for 2 saved) before layer 0 (+2 for 2)
    assert solve_allocation(scores, costs, 7) == [2, 1]
    monkeypatch.setattr(solver, "_milp_choice", lambda *_: None)  # HiGHS failed
    assert total(costs, solve_allocation(scores, costs, 7)) <= 7


def test_bad_shapes_are_errors():
    with pytest.raises(ZsqError, match="same number"):
        solve_allocation([[0, 1], [0]], [[1, 2], [1]], 10)
    with pytest.raises(ZsqError, match="layers x choices"):
        solve_allocation([[0, 1, 2], [0, 1, 2]], [[1, 2], [1, 2]], 10)
    with pytest.raises(ZsqError, match="layers x choices"):
        solve_allocation([[0, 1]], [[1, 2], [1, 2]], 10)
    with pytest.raises(ZsqError, match="finite"):
        solve_allocation([[0, float("nan")]], [[1, 2]], 10)
    with pytest.raises(ZsqError, match="one index per layer"):
        repair([0], [[1, 2], [1, 2]], 10)
    with pytest.raises(ZsqError, match="one index per layer"):
        repair([0, 2], [[1, 2], [1, 2]], 10)
    assert solve_allocation([], [], 0) == []


def test_repair_moves_by_preference_per_unit_saved():
    costs = [[1, 5], [1, 3]]
    # no preference: the largest saving (layer 0 saves 4)
    assert repair([1, 1], costs, 6) == [0, 1]
    # layer 0 costs 10 preference for 4 saved (2.5 per unit), layer 1 costs 1 for 2 saved (0.5)
    assert repair([1, 1], costs, 6, preference=[[10, 0], [1, 0]]) == [1, 0]
    # not enough: both move
    assert repair([1, 1], costs, 2, preference=[[10, 0], [1, 0]]) == [0, 0]
    with pytest.raises(ZsqError, match="smallest achievable cost 2 "):
        repair([1, 1], costs, 1.5)


@pytest.mark.parametrize("seed", range(5))
def test_repair_never_leaves_the_budget_exceeded(seed):
    rng = random.Random(seed)
    for _ in range(40):
        layers, choices = rng.randint(1, 6), rng.randint(1, 5)
        costs = [[rng.uniform(0, 10) for _ in range(choices)] for _ in range(layers)]
        pref = [[rng.uniform(-1, 1) for _ in range(choices)] for _ in range(layers)]
        choice = [rng.randrange(choices) for _ in range(layers)]
        limit = rng.uniform(
            cheapest_cost(costs),
            total(costs, [max(range(choices), key=row.__getitem__) for row in costs]),
        )
        for preference in (None, pref):
            fixed = repair(choice, costs, limit, preference=preference)
            assert total(costs, fixed) <= limit
            if total(costs, choice) <= limit:
                assert fixed == choice
            # every move went to a cheaper choice
            assert all(
                costs[i][f] <= costs[i][c]
                for i, (f, c) in enumerate(zip(fixed, choice, strict=True))
            )
