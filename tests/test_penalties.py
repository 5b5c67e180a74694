"""MAP inside MM: the lasso's quadratic majoriser, the penalised expert and gate solves (argmins,
descent), the inverse-gamma variance prior, and the L1 MM update against coordinate descent."""

import numpy as np
import pytest
import torch
from helpers import random_gaussian_params
from sklearn.linear_model import Lasso

from pyro_mm import GaussianMoE, IncrementalMM
from pyro_mm.models.features import PolynomialFeatures
from pyro_mm.models.params import GaussianExpertParams, MoEParams, tree_map
from pyro_mm.surrogates import (
    GaussianExpertSurrogate,
    gate_surrogate_value,
    gaussian_expert_statistics,
    gaussian_expert_surrogate_value,
    mixture_statistics,
    softmax_curvature,
    solve_gate,
    solve_gaussian_experts,
)
from pyro_mm.surrogates.gate import GateStatistics
from pyro_mm.surrogates.penalties import CoefficientPenalty, InverseGammaPrior

EPS = 1e-6


def test_lasso_majoriser_majorises_and_touches():
    generator = torch.Generator().manual_seed(0)
    penalty = CoefficientPenalty(l1=0.7, l2=0.3, eps=1e-3)
    for _ in range(20):
        anchor = torch.randn(3, 5, generator=generator, dtype=torch.float64)
        anchor[0, 2] = 0.0
        points = 2 * torch.randn(50, 3, 5, generator=generator, dtype=torch.float64)
        gap = penalty.majoriser_value(points, anchor) - penalty.value(points)
        assert gap.min() >= -1e-12
        assert torch.allclose(penalty.majoriser_value(anchor, anchor), penalty.value(anchor))
        at = anchor.clone().requires_grad_()
        (majoriser_grad,) = torch.autograd.grad(penalty.majoriser_value(at, anchor).sum(), at)
        (value_grad,) = torch.autograd.grad(penalty.value(at).sum(), at)
        assert torch.allclose(majoriser_grad, value_grad, atol=1e-12)
    # The intercept column is not penalised; the majoriser's diagonal is alpha / a_n + lambda.
    anchor = torch.tensor([[5.0, 2.0, -0.5]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 0.7 / 2.0 + 0.3, 0.7 / 0.5 + 0.3]], dtype=torch.float64)
    assert torch.allclose(penalty.curvature(anchor), expected, rtol=1e-5)


def _setup(seed, num_experts=3, in_features=4, out_features=2):
    generator = torch.Generator().manual_seed(seed)
    features = PolynomialFeatures(in_features, 1)
    x = torch.randn(200, in_features, generator=generator, dtype=torch.float64)
    y = torch.randn(200, out_features, generator=generator, dtype=torch.float64)
    resp = torch.softmax(2 * torch.randn(200, num_experts, generator=generator), -1).double()
    previous = random_gaussian_params(
        num_experts, features.num_features, out_features, features.num_features, generator
    )
    return x, y, features(x), resp, previous


def _coefficient_surrogate(weight, variance, stats, ridge_mass, penalty, anchor):
    """The expert surrogate at fixed variances, with the lasso majorised at ``anchor``."""
    params = GaussianExpertParams(weight=weight, variance=variance)
    value = gaussian_expert_surrogate_value(params, stats, ridge_mass)
    return value + penalty.majoriser_value(weight, anchor).sum()


@pytest.mark.parametrize("prior", [None, InverseGammaPrior(2.0, 0.5, 50.0)])
def test_penalised_expert_solve_is_the_argmin_and_descends(prior):
    _, y, r, resp, previous = _setup(1)
    penalty = CoefficientPenalty(l1=0.05, l2=0.01)
    surrogate = GaussianExpertSurrogate(ridge=1e-3, penalty=penalty, variance_prior=prior)
    stats = gaussian_expert_statistics(resp, r, y)
    solved, report = surrogate.solve(stats, previous.experts)
    assert not report.empty_experts.any() and report.floored_variances == 0
    ridge_mass = 1e-3 * stats.weight
    leaves = tree_map(lambda t: t.clone().requires_grad_(), solved)
    # Coefficients: argmin at the previous variances of the surrogate with the lasso majorised
    # at the previous coefficients.
    value = _coefficient_surrogate(
        leaves.weight,
        previous.experts.variance,
        stats,
        ridge_mass,
        penalty,
        previous.experts.weight,
    )
    (weight_grad,) = torch.autograd.grad(value, leaves.weight)
    assert weight_grad.abs().max() < 1e-9
    # Variances: exact argmin of the penalised surrogate given the coefficients.
    (variance_grad,) = torch.autograd.grad(surrogate.value(leaves, stats), leaves.variance)
    assert variance_grad.abs().max() < 1e-9
    # MM descent on the penalised surrogate, and repeated solves keep descending.
    values = [surrogate.value(previous.experts, stats).item()]
    current = previous.experts
    for _ in range(5):
        current, _ = surrogate.solve(stats, current)
        values.append(surrogate.value(current, stats).item())
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


def test_variance_prior_gives_the_prior_mode_in_the_limit_of_no_data():
    _, y, r, resp, previous = _setup(2)
    prior = InverseGammaPrior(3.0, 2.0, 1.0)
    stats = gaussian_expert_statistics(resp * 1e-6, r, y)
    solved, _ = solve_gaussian_experts(stats, previous.experts, 0.0, 1e-9, 1e-9, None, prior)
    # With (almost) no data the MAP variance is the prior's mode b / (a + 1).
    assert torch.allclose(solved.variance, torch.full_like(solved.variance, 0.5), rtol=1e-4)


def _mm_lasso(stats, previous, penalty, iterations=3000):
    current = previous
    for _ in range(iterations):
        new, _ = solve_gaussian_experts(stats, current, 0.0, 1e-12, 1e-12, penalty)
        change = (new.weight - current.weight).abs().max().item()
        current = new
        if change < 1e-14:
            break
    return current


@pytest.mark.parametrize("alpha", [0.02, 0.1])
def test_l1_mm_update_matches_coordinate_descent_lasso(alpha):
    """On a fixed weighting, iterating the penalised expert update converges to the weighted
    lasso: scikit-learn's coordinate descent with sample weights. At the fixed point the
    coefficients minimise ``avg tau (y - b.r)^2 / (2 sigma^2) + alpha |b|_1``, i.e. the lasso with
    ``alpha sigma^2``, divided by the mass since scikit-learn divides the squared error by the
    sum of the weights."""
    x, y, r, resp, previous = _setup(3, num_experts=2, in_features=6, out_features=1)
    true = torch.tensor([1.5, 0.0, 0.0, -2.0, 0.0, 0.3], dtype=torch.float64)
    y = (x @ true + 0.5 + 0.3 * torch.randn(200, generator=torch.Generator().manual_seed(9)))[
        :, None
    ].double()
    stats = gaussian_expert_statistics(resp, r, y)
    penalty = CoefficientPenalty(l1=alpha, eps=1e-12)
    fitted = _mm_lasso(stats, previous.experts, penalty)
    zeros = 0
    for k in range(2):
        scale = fitted.variance[k, 0].item() / stats.weight[k].item()
        lasso = Lasso(alpha=alpha * scale, fit_intercept=True, tol=1e-14, max_iter=100_000)
        lasso.fit(x.numpy(), y[:, 0].numpy(), sample_weight=resp[:, k].numpy())
        expected = np.concatenate([[lasso.intercept_], lasso.coef_])
        assert np.abs(fitted.weight[k, 0].numpy() - expected).max() < 1e-6
        zeros += int((lasso.coef_ == 0).sum())
    assert zeros >= 2  # the check covers coefficients the lasso sets to zero


def _quadratic_lasso_cd(matrix, rhs, alpha_mask, sweeps=20_000):
    """Coordinate descent for ``1/2 w^T A w - b^T w + sum_j alpha_j |w_j|``."""
    w = np.zeros_like(rhs)
    for _ in range(sweeps):
        old = w.copy()
        for j in range(len(w)):
            partial = rhs[j] - matrix[j] @ w + matrix[j, j] * w[j]
            w[j] = np.sign(partial) * max(abs(partial) - alpha_mask[j], 0.0) / matrix[j, j]
        if np.abs(w - old).max() < 1e-15:
            break
    return w


@pytest.mark.parametrize("bound", ["bohning", "paper"])
def test_penalised_gate_solve_is_argmin_and_its_fixed_point_is_the_lasso(bound):
    x, y, r, resp, previous = _setup(4, num_experts=3)
    curvature = softmax_curvature(2, bound)
    surrogate = GaussianExpertSurrogate()
    stats, _ = mixture_statistics(surrogate, previous, r, r, y, curvature, EPS)
    penalty = CoefficientPenalty(l1=0.05, l2=0.001, eps=1e-12)
    gate = solve_gate(stats.gate, curvature, EPS, penalty, previous.gate).requires_grad_()
    value = gate_surrogate_value(gate, stats.gate, curvature, EPS)
    value = value + penalty.majoriser_value(gate, previous.gate).sum()
    (grad,) = torch.autograd.grad(value, gate)
    assert grad.abs().max() < 1e-9
    # Iterated at fixed statistics, the update converges to the lasso of the quadratic surrogate.
    current = previous.gate
    for _ in range(5000):
        new = solve_gate(stats.gate, curvature, EPS, penalty, current)
        if (new - current).abs().max() < 1e-15:
            break
        current = new
    mask = penalty.mask(current).expand_as(current).reshape(-1)
    matrix = torch.kron(curvature, stats.gate.gram) + torch.diag(EPS + 0.001 * mask)
    alpha = 0.05 * mask
    expected = _quadratic_lasso_cd(
        matrix.numpy(), stats.gate.linear.reshape(-1).numpy(), alpha.numpy()
    )
    assert np.abs(current.reshape(-1).numpy() - expected).max() < 1e-6
    assert (expected == 0).sum() >= 1


def test_bad_penalties_are_named():
    with pytest.raises(ValueError, match="l1"):
        CoefficientPenalty(l1=-1.0)
    with pytest.raises(ValueError, match="eps"):
        CoefficientPenalty(l1=1.0, eps=0.0)
    with pytest.raises(ValueError, match="rate"):
        InverseGammaPrior(1.0, 0.0, 10.0)
    with pytest.raises(TypeError, match="CoefficientPenalty"):
        GaussianExpertSurrogate(penalty=0.1)
    _, _, _, _, previous = _setup(0)
    stats = GateStatistics(linear=previous.gate, gram=torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="previous"):
        solve_gate(stats, softmax_curvature(2), EPS, CoefficientPenalty(l1=0.1))


def test_incremental_mm_with_lasso_recovers_a_sparse_support():
    generator = torch.Generator().manual_seed(0)
    weight = torch.zeros(2, 1, 11, dtype=torch.float64)
    weight[0, 0, [0, 2, 5]] = torch.tensor([2.0, 1.5, -1.0], dtype=torch.float64)
    weight[1, 0, [0, 3, 8]] = torch.tensor([-2.0, -1.5, 1.2], dtype=torch.float64)
    gate = torch.zeros(1, 11, dtype=torch.float64)
    gate[0, 4] = 2.5
    truth = MoEParams(gate=gate, experts=GaussianExpertParams(weight, torch.full((2, 1), 0.25)))
    sampler = GaussianMoE(2, 10).double()

    def fit(**options):
        model = GaussianMoE(2, 10).double()
        start = MoEParams(
            gate=gate + 0.2, experts=GaussianExpertParams(weight + 0.1, 0.5 * torch.ones(2, 1))
        )
        model.set_params(start)
        infer = IncrementalMM(model, init="current", **options)
        for _ in range(30):
            x = torch.randn(200, 10, generator=generator, dtype=torch.float64)
            infer.step(x, sampler.sample(x, truth, generator=generator)[0])
        return infer.params

    off_support = (weight[:, 0, 1:] == 0).unsqueeze(1)
    plain = fit()
    sparse = fit(penalty=CoefficientPenalty(l1=0.04), gate_penalty=CoefficientPenalty(l1=0.01))
    # Without the penalty most irrelevant coefficients stay visibly non-zero.
    assert (plain.experts.weight[:, :, 1:][off_support].abs() > 1e-3).sum() >= 8
    assert sparse.experts.weight[:, :, 1:][off_support].abs().max() < 1e-3
    assert sparse.experts.weight[:, :, 1:][~off_support].abs().min() > 0.5
    assert (sparse.gate[0, 1:].abs() > 1e-3).tolist() == (gate[0, 1:] != 0).tolist()
