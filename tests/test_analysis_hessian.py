"""Loss-surface analysis against the exact Hessian of a 43-parameter MLP on a fixed batch.

The reference Hessian is ``torch.autograd.functional.hessian`` of the loss as a function of one
flat float64 parameter vector (``torch.func.functional_call``); the analysis runs on the float32
model. Statistical checks use tolerances of at least four standard deviations of the estimator,
computed from the exact Hessian, so with the fixed seeds they are deterministic and meaningful.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from zsq.errors import ZsqError
from zsq.numerics import (
    Density,
    GradientMeter,
    cosine_similarity,
    density_on_grid,
    flat_grad,
    grad_cosine,
    hutchinson_trace,
    hvp,
    lanczos,
    loss_along,
    slq_density,
    top_eigenpairs,
)
from zsq.ptq import calibrate_activations
from zsq.quant import QuantSpec, quant_layers, quantize_model


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def flat_loss(model, x, y):
    """Cross-entropy of ``model`` (a float64 copy) as a function of one flat parameter vector."""
    model = copy.deepcopy(model).double()
    names_shapes = [(name, p.shape) for name, p in model.named_parameters()]

    def loss(theta):
        params, start = {}, 0
        for name, shape in names_shapes:
            params[name] = theta[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return F.cross_entropy(functional_call(model, params, (x.double(),)), y)

    return loss


class Problem:
    """A 4-5-3 tanh MLP (43 parameters), a batch of 32, its loss closure and exact Hessian."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.x = torch.randn(32, 4, generator=gen)
        self.y = torch.randint(0, 3, (32,), generator=gen)
        self.params = list(self.model.parameters())
        self.theta = flat(self.params).double()
        self.n = self.theta.numel()
        self.exact_loss = flat_loss(self.model, self.x, self.y)
        self.H = torch.autograd.functional.hessian(self.exact_loss, self.theta)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.H)

    def loss_fn(self):
        return F.cross_entropy(self.model(self.x), self.y)

    def off_diagonal_sq(self, matrix):
        return float((matrix**2).sum() - (matrix.diagonal() ** 2).sum())


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)
    return Problem()


def test_hvp_equals_exact_hessian_product(problem):
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen) for p in problem.params]
    hv = hvp(problem.loss_fn, problem.params, v)
    assert [t.shape for t in hv] == [p.shape for p in problem.params]
    expected = problem.H @ flat(v).double()
    torch.testing.assert_close(flat(hv).double(), expected, rtol=1e-4, atol=1e-6)
    # a flat vector is accepted too, and .grad fields are left alone
    torch.testing.assert_close(flat(hvp(problem.loss_fn, problem.params, flat(v))), flat(hv))
    assert all(p.grad is None for p in problem.params)


def test_hutchinson_trace_within_5_percent(problem):
    probes = 4000
    trace = float(problem.H.trace())
    sigma = math.sqrt(2 * problem.off_diagonal_sq(problem.H) / probes)  # exact estimator std
    assert 4 * sigma < 0.05 * trace  # so the 5% bound is a >4 sigma bound
    est = hutchinson_trace(problem.loss_fn, problem.params, probes=probes, seed=0)
    assert est.probes == probes
    assert abs(est.mean - trace) < 0.05 * trace
    assert est.std_error == pytest.approx(sigma, rel=0.25)


def test_hutchinson_seeded_time_limited_and_global_rng_untouched(problem):
    rng = torch.get_rng_state()
    a = hutchinson_trace(problem.loss_fn, problem.params, probes=5, seed=3, progress=True)
    b = hutchinson_trace(problem.loss_fn, problem.params, probes=5, seed=3)
    c = hutchinson_trace(problem.loss_fn, problem.params, probes=5, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a == b and a.mean != c.mean
    one = hutchinson_trace(problem.loss_fn, problem.params, probes=50, time_limit_s=0.0)
    assert one.probes == 1 and math.isnan(one.std_error)


def test_top_eigenpairs_match_exact(problem):
    order = problem.eigenvalues.abs().argsort(descending=True)
    values, vectors = top_eigenpairs(problem.loss_fn, problem.params, k=2, seed=0)
    for i in range(2):
        exact = float(problem.eigenvalues[order[i]])
        assert values[i] == pytest.approx(exact, rel=0.01)
        assert [t.shape for t in vectors[i]] == [p.shape for p in problem.params]
        v = flat(vectors[i]).double()
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
        assert abs(float(v @ problem.eigenvectors[:, order[i]])) > 0.99
    assert abs(float(flat(vectors[0]) @ flat(vectors[1]))) < 1e-4


def test_lanczos_moments_equal_start_vector_quadratic_forms(problem):
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(problem.n, generator=gen)
    tri = lanczos(problem.loss_fn, problem.params, iters=5, start=start)
    assert tri.alpha.shape == (5,) and tri.beta.shape == (4,)
    nodes, weights = tri.ritz()
    q = start.double() / start.double().norm()
    for p in range(4):  # Gauss quadrature with 5 nodes is exact up to degree 9
        exact = float(q @ torch.linalg.matrix_power(problem.H, p) @ q)
        assert float((weights * nodes**p).sum()) == pytest.approx(exact, rel=1e-4, abs=1e-7)


def test_lanczos_over_the_full_dimension_gives_the_exact_spectrum(problem):
    tri = lanczos(problem.loss_fn, problem.params, iters=problem.n + 10, seed=0)
    assert tri.alpha.numel() == problem.n  # capped at the dimension
    nodes, weights = tri.ritz()
    scale = float(problem.eigenvalues.abs().max())
    torch.testing.assert_close(nodes, problem.eigenvalues, rtol=0, atol=1e-5 * scale)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_lanczos_restarts_when_the_krylov_space_is_invariant():
    # H = diag(1, 1, 2, 2, 2, 3): a Rademacher start spans only 3 dimensions of Krylov space
    a = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 3.0])
    p = torch.zeros(6, requires_grad=True)
    tri = lanczos(lambda: 0.5 * (a * p**2).sum(), [p], iters=6, seed=0)
    assert tri.beta[2] == 0.0  # restart after step 3
    nodes, weights = tri.ritz()
    torch.testing.assert_close(nodes, a.double(), rtol=0, atol=1e-5)
    # the start vector (+-1/sqrt(6) everywhere) puts mass 2/6, 3/6, 1/6 on the eigenvalues
    mass = [float(weights[(nodes - lam).abs() < 1e-3].sum()) for lam in (1.0, 2.0, 3.0)]
    assert mass == pytest.approx([2 / 6, 3 / 6, 1 / 6], abs=1e-6)


def test_slq_density_moments(problem):
    runs = 500
    density = slq_density(problem.loss_fn, problem.params, iters=4, runs=runs, seed=0)
    assert density.runs == runs and density.dim == problem.n
    for w in density.weights:
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert density.moment(0) == pytest.approx(1.0, abs=1e-12)
    h2 = problem.H @ problem.H
    for p, power in ((1, problem.H), (2, h2)):
        exact = float(power.trace()) / problem.n
        # std of the run average of q.H^p.q, q = z/sqrt(n) with Rademacher z
        sigma = math.sqrt(2 * problem.off_diagonal_sq(power) / runs) / problem.n
        assert 4 * sigma < 0.15 * exact
        assert abs(density.moment(p) - exact) < 4 * sigma


def test_density_on_grid_peak_and_normalisation(problem):
    sigma = 0.1
    single = Density(
        (torch.tensor([0.0], dtype=torch.float64),), (torch.ones(1, dtype=torch.float64),), 1
    )
    values = density_on_grid(single, torch.tensor([0.0, sigma]), sigma)
    peak = 1 / (sigma * math.sqrt(2 * math.pi))
    torch.testing.assert_close(
        values, torch.tensor([peak, peak * math.exp(-0.5)], dtype=torch.float64)
    )

    density = slq_density(problem.loss_fn, problem.params, iters=problem.n, runs=2, seed=1)
    low = min(float(n.min()) for n in density.nodes) - 1
    high = max(float(n.max()) for n in density.nodes) + 1
    grid = torch.linspace(low, high, 4001)
    on_grid = density_on_grid(density, grid, sigma=0.02)
    assert float(torch.trapezoid(on_grid, grid.double())) == pytest.approx(1.0, abs=1e-6)


def test_cosine_similarity_known_vectors():
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(
        1 / math.sqrt(2), rel=1e-15
    )
    as_lists = cosine_similarity([torch.tensor([1.0]), torch.tensor([0.0])], [torch.ones(2)])
    assert as_lists == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert cosine_similarity(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(
        -1.0
    )
    assert math.isnan(cosine_similarity(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ZsqError, match="differ in length"):
        cosine_similarity(torch.ones(2), torch.ones(3))


def test_flat_grad_matches_exact_gradient(problem):
    unused = torch.ones(2, requires_grad=True)
    g = flat_grad(problem.loss_fn, problem.params + [unused])
    exact = torch.func.grad(problem.exact_loss)(problem.theta)
    torch.testing.assert_close(g[: problem.n].double(), exact, rtol=1e-5, atol=1e-7)
    assert torch.equal(g[problem.n :], torch.zeros(2))
    assert cosine_similarity(g, g) == pytest.approx(1.0, abs=1e-15)
    assert grad_cosine(problem.loss_fn, problem.loss_fn, problem.params) == pytest.approx(1.0)


def test_gradient_meter_inter_epoch_cosine():
    meter = GradientMeter()
    meter.update(torch.tensor([1.0, 0.0]))
    meter.update([torch.tensor([1.0]), torch.tensor([2.0])])
    assert meter.end_epoch() is None  # mean (1, 1), nothing to compare with
    meter.update(torch.tensor([0.0, 2.0]))
    meter.update(torch.tensor([0.0, 0.0]))
    assert meter.end_epoch() == pytest.approx(1 / math.sqrt(2), rel=1e-15)  # mean (0, 1)
    torch.testing.assert_close(meter.previous_mean, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert len(meter.cosines) == 1
    with pytest.raises(ZsqError, match="no gradient recorded"):
        meter.end_epoch()


def test_loss_along_matches_shifted_model_and_restores_params(problem):
    before = [p.detach().clone() for p in problem.params]
    gen = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=gen) for p in problem.params]
    ks = [-0.5, -0.1, 0.0, 0.25, 0.5]
    losses = loss_along(problem.loss_fn, problem.params, direction, ks)
    for k, loss in zip(ks, losses, strict=True):
        shifted = copy.deepcopy(problem.model)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction, strict=True):
                p.copy_(p + k * d)
        assert loss == pytest.approx(
            float(F.cross_entropy(shifted(problem.x), problem.y).detach()), rel=1e-6
        )
    assert losses[2] == pytest.approx(float(problem.loss_fn().detach()), rel=1e-7)
    assert all(torch.equal(p, b) for p, b in zip(problem.params, before, strict=True))


def test_loss_along_restores_params_after_an_error(problem):
    before = [p.detach().clone() for p in problem.params]
    calls = []

    def failing_loss():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return problem.loss_fn()

    with pytest.raises(RuntimeError, match="boom"):
        loss_along(failing_loss, problem.params, flat(problem.params), [0.3, 0.7])
    assert all(torch.equal(p, b) for p, b in zip(problem.params, before, strict=True))


def test_bad_inputs_raise_zsq_errors(problem):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ZsqError, match="does not depend on the parameters"):
        hutchinson_trace(lambda: torch.tensor(1.0), [p])
    with pytest.raises(ZsqError, match="requires_grad"):
        flat_grad(problem.loss_fn, [torch.zeros(3)])
    with pytest.raises(ZsqError, match="match the parameters"):
        hvp(problem.loss_fn, problem.params, [torch.zeros(3)])
    with pytest.raises(ZsqError, match="eigenpairs asked"):
        top_eigenpairs(problem.loss_fn, problem.params, k=problem.n + 1)


def test_fake_quant_student_hessian_is_that_of_its_dequantized_weights():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4), (1, 6, 6))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    calibrate_activations(student, [x])
    # the same network with float weights set to the student's dequantized ones
    reference = copy.deepcopy(student)
    with torch.no_grad():
        for (_, q), (_, r) in zip(quant_layers(student), quant_layers(reference), strict=True):
            r.weight.copy_(q.fake_quant_weight())
            r.wbits = None
            assert not torch.equal(q.weight, r.weight)  # quantization does change the weights
    params, ref_params = list(student.parameters()), list(reference.parameters())

    def loss_fn():
        return F.cross_entropy(student(x), y)

    gen = torch.Generator().manual_seed(0)
    v1 = [torch.randn(p.shape, generator=gen) for p in params]
    v2 = [torch.randn(p.shape, generator=gen) for p in params]
    hv1 = hvp(loss_fn, params, v1)
    ref_hv1 = hvp(lambda: F.cross_entropy(reference(x), y), ref_params, v1)
    # STE: identity gradient and zero second derivative through the quantizer, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(hv1, ref_hv1, strict=True))
    assert float(flat(hv1).abs().max()) > 0
    hv2 = hvp(loss_fn, params, v2)
    assert float(flat(v1) @ flat(hv2)) == pytest.approx(float(flat(v2) @ flat(hv1)), rel=1e-5)
    est = hutchinson_trace(loss_fn, params, probes=20)
    assert math.isfinite(est.mean) and est.probes == 20
