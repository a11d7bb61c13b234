"""The differentiable bit-width search: projection math, budget guarantees, baseline, isolation."""

import pytest
import torch
from tests._teachers import tiny_teacher

from zsq.errors import ZsqError
from zsq.mixed.search import (
    _mixture_weight,
    constrained_gradient,
    differentiable_search,
    expected_cost,
)
from zsq.quant import QuantSpec
from zsq.quant.model import quant_layers, quantize_model, set_observing

CHOICES = (2, 4, 8)


def sample(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8)


def make_student(teacher, spec: QuantSpec):
    student = quantize_model(teacher, spec, (3, 8, 8))
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            student(sample(32))
    set_observing(student, False)
    return student


@pytest.fixture(scope="module")
def problem():
    """tiny_teacher's three layers, costs = bits x weights, budget = uniform 3 bits."""
    teacher = tiny_teacher()
    student = make_student(teacher, QuantSpec(wbits=8, abits=8))
    params = [layer.weight.numel() for _, layer in quant_layers(student)]
    assert params == [216, 1152, 160]
    costs = [[float(bits * p) for bits in CHOICES] for p in params]
    return teacher, student, costs, 3.0 * sum(params)


def total(costs, choice):
    return sum(costs[layer][c] for layer, c in enumerate(choice))


def test_projection_reaches_the_budget_exactly_to_first_order():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    d = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    cost, limit, lr = 10.0, 7.0, 0.5
    projected = constrained_gradient(g, d, cost, limit, lr)
    # <d, g> = -0.5, ||d||^2 = 6: lam = (3 / 0.5 + 0.5) / 6 = 13 / 12
    assert torch.allclose(projected, g + 13 / 12 * d, rtol=0, atol=1e-15)
    assert lr * float(d @ projected) == pytest.approx(cost - limit, abs=1e-12)
    # the plain step would have raised the cost: lr * <d, g> < 0
    assert lr * float(d @ g) < 0


def test_projection_leaves_a_good_gradient_alone():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    d = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    assert torch.equal(constrained_gradient(g, d, 7.0, 7.0, 0.5), g)  # E <= limit
    assert torch.equal(constrained_gradient(g, d, 5.0, 7.0, 0.5), g)
    assert torch.equal(constrained_gradient(g, torch.zeros_like(d), 10.0, 7.0, 0.5), g)
    steep = 10 * d  # lr * <d, g> = 30 >= E - limit = 3 already: lam = 0
    assert torch.equal(constrained_gradient(steep, d, 10.0, 7.0, 0.5), steep)


def test_expected_cost_is_the_probability_weighted_sum():
    logits = torch.tensor([[0.0, 0.0], [0.0, torch.log(torch.tensor(3.0))]])
    costs = torch.tensor([[2.0, 4.0], [10.0, 20.0]])
    assert float(expected_cost(logits, costs)) == pytest.approx(3.0 + 0.25 * 10 + 0.75 * 20)


@pytest.mark.parametrize("symmetric", [False, True])
def test_one_hot_mixture_is_the_layers_own_fake_quantization(symmetric):
    teacher = tiny_teacher()
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=None, w_symmetric=symmetric))
    logits = torch.tensor([[-1e4, 1e4, -1e4]])  # softmax exactly (0, 1, 0): 4 bits
    for _, layer in quant_layers(student):
        mixed = _mixture_weight(layer, CHOICES, logits, torch.ones(()), 0)
        assert torch.equal(mixed, layer.fake_quant_weight())


def test_constrained_search_ends_inside_the_budget(problem):
    teacher, student, costs, limit = problem
    for seed in range(5):
        result = differentiable_search(
            teacher, student, CHOICES, costs, limit, sample, steps=60, seed=seed, progress=False
        )
        assert result.expected_cost[0] < total(costs, [1, 1, 1])  # uniform start: 4.67 bits
        assert result.final_expected_cost <= limit * (1 + 1e-3)
        assert max(result.expected_cost) <= limit * (1 + 1e-3)  # every step within the budget
        assert result.final_cost == total(costs, result.choice) <= limit
        assert len(result.expected_cost) == 60 and result.seconds > 0
        assert all(sum(p) == pytest.approx(1.0) for p in result.probs)


def test_small_penalty_misses_the_budget_and_repair_fixes_the_choice(problem):
    teacher, student, costs, limit = problem
    result = differentiable_search(
        teacher,
        student,
        CHOICES,
        costs,
        limit,
        sample,
        mode="penalty",
        penalty=1e-4,
        steps=60,
        progress=False,
    )
    assert result.final_expected_cost > 1.3 * limit  # the penalty hardly moved the logits
    assert total(costs, result.argmax_choice) > limit
    assert result.repaired
    assert result.final_cost == total(costs, result.choice) <= limit


@pytest.mark.parametrize("fraction", [2.05 / 3, 2.5 / 3, 1.0, 1.3])
def test_chosen_allocation_never_exceeds_the_limit(problem, fraction):
    teacher, student, costs, limit = problem
    limit *= fraction
    for mode, penalty in (("constrained", 1.0), ("penalty", 0.0)):
        result = differentiable_search(
            teacher,
            student,
            CHOICES,
            costs,
            limit,
            sample,
            mode=mode,
            penalty=penalty,
            steps=3,
            progress=False,
        )
        assert total(costs, result.choice) <= limit
        assert result.repaired == (total(costs, result.argmax_choice) > limit)


def test_impossible_limit_fails_before_any_work(problem):
    teacher, student, costs, _ = problem
    drawn = []

    def counting_sample(n):
        drawn.append(n)
        return sample(n)

    smallest = 2 * (216 + 1152 + 160)
    with pytest.raises(ZsqError) as err:
        differentiable_search(
            teacher, student, CHOICES, costs, smallest - 1, counting_sample, progress=False
        )
    message = str(err.value)
    assert "\n" not in message and f"{smallest:.6g}" in message
    assert drawn == []
    # exactly the smallest achievable cost is feasible
    result = differentiable_search(
        teacher, student, CHOICES, costs, smallest, counting_sample, steps=2, progress=False
    )
    assert result.choice == [0, 0, 0] and drawn == [32, 32]


def test_student_teacher_and_rng_untouched(problem):
    teacher, student, costs, limit = problem
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = differentiable_search(
        teacher, student, CHOICES, costs, limit, sample, steps=5, weight_lr=1e-2, progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    for key, value in student.state_dict().items():
        assert torch.equal(value, student_before[key]), key
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all("fake_quant_weight" not in vars(layer) for _, layer in quant_layers(student))
    assert not teacher.training
    again = differentiable_search(
        teacher, student, CHOICES, costs, limit, sample, steps=5, weight_lr=1e-2, progress=False
    )
    assert again.expected_cost == first.expected_cost and again.probs == first.probs


def test_bad_arguments_say_how_to_fix(problem):
    teacher, student, costs, limit = problem
    with pytest.raises(ZsqError, match="mode"):
        differentiable_search(teacher, student, CHOICES, costs, limit, sample, mode="soft")
    with pytest.raises(ZsqError, match="one row per quantized layer"):
        differentiable_search(teacher, student, CHOICES, costs[:2], limit, sample)
    with pytest.raises(ZsqError, match="bit width"):
        differentiable_search(teacher, student, (2, 4, 16), costs, limit, sample)
