"""The per-sample Jaakkola-Jordan gate bound (two experts): it majorises the logistic
log-partition and touches it at the current logits, its statistics represent the surrogate, its
solve is the surrogate's argmin, and batch MM with it is monotone and faster than Böhning's."""

import math

import pytest
import torch
from helpers import random_gaussian_params

from pyro_mm.infer import IncrementalMM
from pyro_mm.infer.em import batch_mm
from pyro_mm.models import GaussianExpertParams, GaussianMoE, MoEParams
from pyro_mm.models.features import PolynomialFeatures
from pyro_mm.models.gating import gate_log_probs
from pyro_mm.models.gaussian_moe import gaussian_expert_log_prob
from pyro_mm.surrogates import (
    GaussianExpertSurrogate,
    JaakkolaJordanBound,
    MultinomialExpertSurrogate,
    gate_surrogate_value,
    mixture_statistics,
    softmax_curvature,
    solve_gate,
)

EPS = 1e-6


def _softplus(eta):
    return torch.nn.functional.softplus(eta)


def _jj_upper(eta, xi):
    """``f(xi) + f'(xi)(eta - xi) + lambda(xi)(eta - xi)^2`` with
    ``2 lambda = sample_curvature``."""
    half_curvature = JaakkolaJordanBound.sample_curvature(xi) / 2
    return _softplus(xi) + torch.sigmoid(xi) * (eta - xi) + half_curvature * (eta - xi).square()


def test_sample_curvature_is_tanh_formula_and_at_most_a_quarter():
    xi = torch.linspace(-40, 40, 8001, dtype=torch.float64)
    xi = xi[xi.abs() > 1e-3]
    expected = torch.tanh(xi / 2) / (2 * xi)
    assert torch.allclose(JaakkolaJordanBound.sample_curvature(xi), expected, rtol=1e-14)
    tiny = torch.tensor([0.0, 1e-9, -5e-5, 9.99e-5, 1.01e-4], dtype=torch.float64)
    values = JaakkolaJordanBound.sample_curvature(tiny)
    assert values[0].item() == 0.25
    # Continuous across the switch to the series.
    assert torch.allclose(values, 0.25 - tiny.square() / 48, atol=1e-16)
    assert JaakkolaJordanBound.sample_curvature(xi).max() <= 0.25


def test_scalar_bound_majorises_and_touches_at_plus_minus_xi():
    xi = torch.linspace(-12, 12, 97, dtype=torch.float64)
    eta = torch.linspace(-30, 30, 601, dtype=torch.float64)
    gap = _jj_upper(eta[None, :], xi[:, None]) - _softplus(eta[None, :])
    assert gap.min() >= -1e-12
    assert torch.allclose(_jj_upper(xi, xi), _softplus(xi), atol=1e-14)
    assert torch.allclose(_jj_upper(-xi, xi), _softplus(-xi), atol=1e-12)
    # Tighter than Böhning's constant curvature 1/4 everywhere.
    bohning = _softplus(xi[:, None]) + torch.sigmoid(xi[:, None]) * (eta - xi[:, None])
    bohning = bohning + 0.125 * (eta - xi[:, None]).square()
    assert (_jj_upper(eta[None, :], xi[:, None]) <= bohning + 1e-12).all()


def _setup(seed, in_features=2, out_features=1, degree=2):
    generator = torch.Generator().manual_seed(seed)
    gate_map, expert_map = (
        PolynomialFeatures(in_features, degree),
        PolynomialFeatures(in_features, 1),
    )
    x = torch.randn(40, in_features, generator=generator, dtype=torch.float64)
    y = 2 * torch.randn(40, out_features, generator=generator, dtype=torch.float64)
    u, r = gate_map(x), expert_map(x)
    anchor = random_gaussian_params(2, u.shape[1], out_features, r.shape[1], generator, scale=1.5)
    return generator, u, r, y, anchor


def _nll(params, u, r, y):
    return -torch.logsumexp(
        gate_log_probs(params.gate, u) + gaussian_expert_log_prob(params.experts, r, y), -1
    )


def _direct_surrogate(params, anchor, u, r, y):
    """Jensen's bound at the anchor's responsibilities, with the gate's ``log(1 + e^eta)``
    replaced by the Jaakkola-Jordan bound touching at the anchor's logit, plus ``eps/2 ||d||^2``."""
    log_joint = gate_log_probs(anchor.gate, u) + gaussian_expert_log_prob(anchor.experts, r, y)
    tau = torch.softmax(log_joint, -1)
    entropy_term = (tau * tau.clamp_min(1e-300).log()).sum(-1)
    expert_term = -(tau * gaussian_expert_log_prob(params.experts, r, y)).sum(-1)
    eta, xi = u @ params.gate[0], u @ anchor.gate[0]
    ridge = 0.5 * EPS * (params.gate - anchor.gate).square().sum()
    return entropy_term + expert_term - tau[:, 0] * eta + _jj_upper(eta, xi) + ridge


@pytest.mark.parametrize("seed", range(6))
def test_surrogate_majorises_and_touches(seed):
    generator, u, r, y, anchor = _setup(seed)
    assert torch.allclose(_direct_surrogate(anchor, anchor, u, r, y), _nll(anchor, u, r, y))
    for _ in range(5):
        point = random_gaussian_params(2, u.shape[1], 1, r.shape[1], generator, scale=3.0)
        gap = _direct_surrogate(point, anchor, u, r, y) - _nll(point, u, r, y)
        assert gap.min() >= -1e-10


def test_statistics_represent_the_surrogate_and_the_solve_is_its_argmin():
    generator, u, r, y, anchor = _setup(11)
    bound = softmax_curvature(1, "jaakkola-jordan")
    surrogate = GaussianExpertSurrogate(ridge=0.0)
    stats, _ = mixture_statistics(surrogate, anchor, u, r, y, bound, EPS)
    differences = []
    for _ in range(6):
        point = random_gaussian_params(2, u.shape[1], 1, r.shape[1], generator, scale=2.0)
        from_stats = gate_surrogate_value(point.gate, stats.gate, bound, EPS)
        from_stats = from_stats + surrogate.value(point.experts, stats.experts)
        direct = _direct_surrogate(point, anchor, u, r, y).mean()
        differences.append((from_stats - direct).item())
    assert max(differences) - min(differences) < 1e-10

    gate = solve_gate(stats.gate, bound, EPS).requires_grad_()
    (grad,) = torch.autograd.grad(gate_surrogate_value(gate, stats.gate, bound, EPS), gate)
    assert grad.abs().max() < 1e-8
    # The Jaakkola-Jordan surrogate lies below Böhning's at the new point: tighter.
    bohning = softmax_curvature(1, "bohning")
    bohning_stats, _ = mixture_statistics(surrogate, anchor, u, r, y, bohning, EPS)
    point = gate.detach() + 0.5
    assert gate_surrogate_value(point, stats.gate, bound, EPS) < gate_surrogate_value(
        point, bohning_stats.gate, bohning, EPS
    )


def _two_expert_data(num_rows=600, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(num_rows, 1, generator=generator, dtype=torch.float64) * 2 - 1
    gate = torch.sigmoid(8 * x[:, 0] - 1)
    z = torch.rand(num_rows, generator=generator, dtype=torch.float64) < gate
    mean = torch.where(z, 2 + 3 * x[:, 0], -1 - 2 * x[:, 0])
    y = mean + 0.3 * torch.randn(num_rows, generator=generator, dtype=torch.float64)
    return x, y


def _batch_mm_losses(bound, x, y, steps):
    model = GaussianMoE(2, 1).double()
    start = MoEParams(
        gate=torch.tensor([[0.0, 1.0]], dtype=torch.float64),
        experts=GaussianExpertParams(
            weight=torch.tensor([[[1.0, 1.0]], [[-1.0, 0.0]]], dtype=torch.float64),
            variance=torch.ones(2, 1, dtype=torch.float64),
        ),
    )
    model.set_params(start)
    mm = batch_mm(model, gate_bound=bound, init="current")
    return [mm.step(x, y) for _ in range(steps)]


def test_batch_mm_with_jaakkola_jordan_is_monotone_and_faster_than_bohning():
    x, y = _two_expert_data()
    jj = _batch_mm_losses("jaakkola-jordan", x, y, 30)
    bohning = _batch_mm_losses("bohning", x, y, 30)
    assert all(b <= a + 1e-10 for a, b in zip(jj, jj[1:]))
    assert jj[0] == bohning[0]
    # Same start; the per-sample bound is tighter, so it is ahead after the same number of steps.
    assert jj[-1] < bohning[-1] - 5e-4


def test_bound_names_are_checked():
    with pytest.raises(ValueError, match="two classes"):
        softmax_curvature(2, "jaakkola-jordan")
    with pytest.raises(ValueError, match="two classes"):
        IncrementalMM(GaussianMoE(3, 1), gate_bound="jaakkola-jordan")
    with pytest.raises(ValueError, match="unknown softmax bound"):
        MultinomialExpertSurrogate(ridge=1e-3, bound="jaakkola-jordan")
    assert math.isclose(softmax_curvature(1, "bohning").item(), 0.25)
