"""The MM surrogate is a majoriser that touches the NLL, and each closed-form solve is its
argmin."""

import math

import pytest
import torch
from helpers import random_gaussian_params
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_mm.models.features import PolynomialFeatures
from pyro_mm.models.gating import gate_log_probs
from pyro_mm.models.gaussian_moe import gaussian_expert_log_prob
from pyro_mm.models.params import tree_map
from pyro_mm.surrogates import (
    GaussianExpertSurrogate,
    gate_surrogate_value,
    mixture_statistics,
    softmax_curvature,
    solve_gate,
    solve_gaussian_experts,
    solve_kronecker,
)

BOUNDS = ["bohning", "paper"]
EPS = 1e-6


def _data(num_rows, in_features, out_features, generator):
    x = torch.randn(num_rows, in_features, generator=generator, dtype=torch.float64)
    y = 2 * torch.randn(num_rows, out_features, generator=generator, dtype=torch.float64)
    return x, y


def _per_sample_nll(params, u, r, y):
    return -torch.logsumexp(
        gate_log_probs(params.gate, u) + gaussian_expert_log_prob(params.experts, r, y), -1
    )


def _direct_surrogate(params, anchor, u, r, y, curvature):
    """Eq. (18) transcribed per sample: Jensen's bound at the anchor's responsibilities plus the
    quadratic bound of the gate's log-partition with B = C (x) u u^T + eps I."""
    log_joint = gate_log_probs(anchor.gate, u) + gaussian_expert_log_prob(anchor.experts, r, y)
    tau = torch.softmax(log_joint, -1)
    entropy_term = (tau * tau.clamp_min(1e-300).log()).sum(-1)
    expert_term = -(tau * gaussian_expert_log_prob(params.experts, r, y)).sum(-1)
    logits = torch.nn.functional.pad(u @ params.gate.T, (0, 1))
    anchor_logits = torch.nn.functional.pad(u @ anchor.gate.T, (0, 1))
    linear_gate = -(tau * logits).sum(-1)
    gate_probs = torch.softmax(anchor_logits, -1)[:, :-1]
    delta = params.gate - anchor.gate  # (K-1, D)
    delta_u = u @ delta.T  # (N, K-1): (delta (x) u) contracted per sample
    gradient_term = (gate_probs * delta_u).sum(-1)
    quadratic = ((delta_u @ curvature) * delta_u).sum(-1) + EPS * delta.square().sum()
    lse_bound = torch.logsumexp(anchor_logits, -1) + gradient_term + 0.5 * quadratic
    return entropy_term + expert_term + linear_gate + lse_bound


def _setup(seed, num_experts, in_features, out_features, degree):
    generator = torch.Generator().manual_seed(seed)
    gate_map = PolynomialFeatures(in_features, degree)
    expert_map = PolynomialFeatures(in_features, 1)
    x, y = _data(40, in_features, out_features, generator)
    u, r = gate_map(x), expert_map(x)
    anchor = random_gaussian_params(
        num_experts, u.shape[1], out_features, r.shape[1], generator, scale=0.5
    )
    return generator, u, r, y, anchor


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_experts=st.integers(2, 5),
    in_features=st.integers(1, 3),
    out_features=st.integers(1, 2),
    degree=st.integers(1, 2),
    bound=st.sampled_from(BOUNDS),
)
def test_surrogate_majorises_and_touches(
    seed, num_experts, in_features, out_features, degree, bound
):
    generator, u, r, y, anchor = _setup(seed, num_experts, in_features, out_features, degree)
    curvature = softmax_curvature(num_experts - 1, bound)
    at_anchor = _direct_surrogate(anchor, anchor, u, r, y, curvature)
    assert torch.allclose(at_anchor, _per_sample_nll(anchor, u, r, y), atol=1e-10, rtol=0)
    for _ in range(5):
        point = random_gaussian_params(
            num_experts, u.shape[1], out_features, r.shape[1], generator, scale=2.0
        )
        gap = _direct_surrogate(point, anchor, u, r, y, curvature) - _per_sample_nll(point, u, r, y)
        assert gap.min() >= -1e-10


@pytest.mark.parametrize("bound", BOUNDS)
def test_statistics_represent_the_surrogate_up_to_a_constant(bound):
    """Surrogate from the averaged statistics minus the direct average is constant in theta."""
    generator, u, r, y, anchor = _setup(3, 3, 2, 2, 2)
    curvature = softmax_curvature(2, bound)
    surrogate = GaussianExpertSurrogate(ridge=0.0)
    stats, _ = mixture_statistics(surrogate, anchor, u, r, y, curvature, EPS)
    differences = []
    for _ in range(6):
        point = random_gaussian_params(3, u.shape[1], 2, r.shape[1], generator, scale=2.0)
        from_stats = gate_surrogate_value(point.gate, stats.gate, curvature, EPS)
        from_stats = from_stats + surrogate.value(point.experts, stats.experts)
        direct = _direct_surrogate(point, anchor, u, r, y, curvature).mean()
        differences.append((from_stats - direct).item())
    assert max(differences) - min(differences) < 1e-10


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("ridge, intercept", [(0.0, None), (1e-3, None), (1e-3, 0)])
def test_closed_form_solves_are_argmins(bound, ridge, intercept):
    generator, u, r, y, anchor = _setup(7, 4, 3, 2, 2)
    curvature = softmax_curvature(3, bound)
    surrogate = GaussianExpertSurrogate(ridge=ridge, unpenalised_column=intercept)
    stats, _ = mixture_statistics(surrogate, anchor, u, r, y, curvature, EPS)

    gate = solve_gate(stats.gate, curvature, EPS).requires_grad_()
    (gate_grad,) = torch.autograd.grad(gate_surrogate_value(gate, stats.gate, curvature, EPS), gate)
    assert gate_grad.abs().max() < 1e-8

    experts, report = surrogate.solve(stats.experts, anchor.experts)
    assert not report.empty_experts.any() and report.floored_variances == 0
    leaves = tree_map(lambda t: t.clone().requires_grad_(), experts)
    value = surrogate.value(leaves, stats.experts)
    grads = torch.autograd.grad(value, [leaves.weight, leaves.variance])
    assert max(g.abs().max().item() for g in grads) < 1e-8


def test_kronecker_solve_matches_dense_solve():
    generator = torch.Generator().manual_seed(0)
    left = softmax_curvature(3, "paper")
    features = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    right = features.T @ features / 30
    rhs = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    dense = torch.kron(left, right) + 0.1 * torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.solve(dense, rhs.reshape(-1)).reshape(3, 4)
    assert torch.allclose(solve_kronecker(left, right, 0.1, rhs), expected, atol=1e-12)


def test_bounds_dominate_the_softmax_hessian():
    generator = torch.Generator().manual_seed(0)
    for num_classes in (2, 3, 5, 8):
        bohning = softmax_curvature(num_classes - 1, "bohning")
        paper = softmax_curvature(num_classes - 1, "paper")
        assert torch.linalg.eigvalsh(paper - bohning).min() >= -1e-12
        for _ in range(50):
            probs = torch.softmax(3 * torch.randn(num_classes, generator=generator), 0).double()
            free = probs[:-1]
            hessian = torch.diag(free) - torch.outer(free, free)
            assert torch.linalg.eigvalsh(bohning - hessian).min() >= -1e-12
    assert torch.allclose(
        softmax_curvature(1, "bohning"), torch.tensor([[0.25]], dtype=torch.float64)
    )


def test_empty_expert_keeps_previous_parameters_and_floor_is_reported():
    generator, u, r, y, anchor = _setup(1, 3, 2, 1, 1)
    resp = torch.zeros(len(y), 3, dtype=torch.float64)
    resp[:, 0] = 1.0
    surrogate = GaussianExpertSurrogate()
    stats = surrogate.statistics(anchor.experts, r, y, resp)
    experts, report = solve_gaussian_experts(stats, anchor.experts)
    assert report.empty_experts.tolist() == [False, True, True]
    assert torch.equal(experts.weight[1:], anchor.experts.weight[1:])
    # An expert that fits its points exactly has zero residual variance: floored, not NaN.
    exact_y = r @ torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    stats = surrogate.statistics(anchor.experts, r, exact_y, resp)
    experts, report = solve_gaussian_experts(stats, anchor.experts, variance_floor=1e-6)
    assert report.floored_variances == 1
    assert math.isclose(experts.variance[0, 0].item(), 1e-6)
