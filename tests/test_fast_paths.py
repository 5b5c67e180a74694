"""The throughput rewrites of the hot path compute what the plain formulas compute."""

import pytest
import torch
from helpers import random_gaussian_params

from pyro_mm import GaussianMoE, MultinomialMoE
from pyro_mm.models.gating import gate_log_probs, gate_logits
from pyro_mm.models.gaussian_moe import gaussian_expert_log_prob, gaussian_expert_means
from pyro_mm.models.params import tree_leaves
from pyro_mm.surrogates import (
    GaussianExpertSurrogate,
    MultinomialExpertSurrogate,
    e_step,
    mixture_statistics,
    moments,
    softmax_curvature,
)
from pyro_mm.surrogates.full_covariance_expert import full_covariance_expert_statistics
from pyro_mm.surrogates.gate import _DENSE_SIZE, GateStatistics, solve_gate
from pyro_mm.surrogates.gaussian_expert import (
    _penalised_residual,
    gaussian_expert_statistics,
    ridge_diagonal,
    solve_gaussian_experts,
)
from pyro_mm.surrogates.moments import weighted_gram, weighted_moments, weighted_outer_products
from pyro_mm.surrogates.registry import fused_statistics_for
from pyro_mm.surrogates.softmax_bound import solve_kronecker


def _data(num_rows, dim, out_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    features[:, 0] = 1.0
    y = torch.randn(num_rows, out_features, generator=generator, dtype=torch.float64)
    return features, y, generator


@pytest.mark.parametrize("num_experts, dim", [(2, 11), (4, 9), (8, 10), (3, 40)])
def test_gate_solve_equals_the_eigendecomposition_solve(num_experts, dim):
    features, _, generator = _data(300, dim, 1)
    gram = features.T @ features / 300
    linear = torch.randn(num_experts - 1, dim, generator=generator, dtype=torch.float64)
    curvature = softmax_curvature(num_experts - 1, "paper")
    expected = solve_kronecker(curvature, gram, 1e-6, linear)
    solved = solve_gate(GateStatistics(linear=linear, gram=gram), curvature, 1e-6)
    dense = (num_experts - 1) * dim <= _DENSE_SIZE
    assert dense == ((num_experts, dim) in [(2, 11), (4, 9)])
    assert torch.allclose(solved, expected, rtol=1e-9, atol=1e-12)


def test_gate_log_probs_are_the_log_softmax_of_the_logits_also_batched():
    features, _, generator = _data(50, 4, 1)
    weight = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)  # batch of 3
    expected = torch.log_softmax(gate_logits(weight, features), -1)
    assert torch.allclose(gate_log_probs(weight, features), expected, atol=1e-14)


@pytest.mark.parametrize("out_features", [1, 3])
def test_expert_log_prob_and_e_step_match_the_plain_formulas(out_features):
    features, y, generator = _data(60, 5, out_features)
    params = random_gaussian_params(3, 5, out_features, 5, generator)
    means = gaussian_expert_means(params.experts.weight, features)
    normal = torch.distributions.Normal(means, params.experts.variance.sqrt())
    log_expert = normal.log_prob(y.unsqueeze(-2)).sum(-1)
    assert torch.allclose(
        gaussian_expert_log_prob(params.experts, features, y), log_expert, atol=1e-12
    )
    y[0] = 1e200  # a row whose every expert density underflows to zero
    log_joint = torch.log_softmax(gate_logits(params.gate, features), -1) + normal.log_prob(
        y.unsqueeze(-2)
    ).sum(-1)
    gate_probs, resp, log_lik = e_step(GaussianExpertSurrogate(), params, features, features, y)
    assert torch.equal(log_lik[0], torch.logsumexp(log_joint, -1)[0])  # -inf, as logsumexp
    assert torch.allclose(log_lik[1:], torch.logsumexp(log_joint, -1)[1:], atol=1e-12)
    assert torch.allclose(resp[1:], torch.softmax(log_joint, -1)[1:], atol=1e-14)
    assert torch.allclose(gate_probs, torch.softmax(gate_logits(params.gate, features), -1))


@pytest.mark.parametrize("chunked", [False, True])
def test_expert_statistics_match_a_loop_over_experts(monkeypatch, chunked):
    if chunked:
        _in_chunks_of_16_rows(monkeypatch)
    features, y, generator = _data(80, 4, 2)
    resp = torch.softmax(torch.randn(80, 3, generator=generator, dtype=torch.float64), -1)
    stats = gaussian_expert_statistics(resp, features, y)
    full = full_covariance_expert_statistics(resp, features, y)
    for k in range(3):
        weighted = features * resp[:, k : k + 1]
        assert torch.allclose(stats.gram[k], weighted.T @ features / 80, atol=1e-14)
        assert torch.allclose(stats.cross[k], y.T @ weighted / 80, atol=1e-14)
        assert torch.allclose(stats.square[k], resp[:, k] @ y.square() / 80, atol=1e-14)
        weighted_y = y * resp[:, k : k + 1]
        assert torch.allclose(full.square[k], weighted_y.T @ y / 80, atol=1e-14)
    assert torch.allclose(stats.weight, resp.mean(0))
    for name in ("weight", "gram", "cross"):
        assert torch.equal(getattr(full, name), getattr(stats, name))


def test_expert_variance_uses_the_normal_equations_identity():
    features, y, generator = _data(200, 4, 2)
    resp = torch.softmax(torch.randn(200, 3, generator=generator, dtype=torch.float64), -1)
    stats = gaussian_expert_statistics(resp, features, y)
    previous = random_gaussian_params(3, 4, 2, 4, generator).experts
    for intercept in (None, 0):
        params, _ = solve_gaussian_experts(
            stats, previous, ridge=1e-3, variance_floor=1e-12, unpenalised_column=intercept
        )
        penalty = ridge_diagonal(1e-3 * stats.weight, 4, intercept)
        expected = _penalised_residual(params.weight, stats, penalty) / stats.weight[:, None]
        assert torch.allclose(params.variance, expected, rtol=1e-12)


def test_features_are_computed_once_when_the_maps_are_equal():
    x = torch.randn(10, 3, dtype=torch.float64)
    same = GaussianMoE(2, 3).double()
    gate_features, expert_features = same.features(x)
    assert gate_features is expert_features
    different = GaussianMoE(2, 3, gate_degree=2).double()
    gate_features, expert_features = different.features(x)
    assert gate_features.shape == (10, 7) and expert_features.shape == (10, 4)


@pytest.mark.parametrize(
    "num_experts, out_features, degree, bound",
    [(2, 1, 1, "bohning"), (2, 1, 1, "jaakkola-jordan"), (3, 2, 2, "paper"), (5, 3, 1, "bohning")],
)
def test_one_pass_gaussian_statistics_equal_the_block_by_block_statistics(
    num_experts, out_features, degree, bound
):
    generator = torch.Generator().manual_seed(7)
    model = GaussianMoE(num_experts, 3, out_features, degree, degree).double()
    x = torch.randn(90, 3, generator=generator, dtype=torch.float64)
    y = 2 * torch.randn(90, out_features, generator=generator, dtype=torch.float64)
    dim = model.expert_features.num_features
    params = random_gaussian_params(num_experts, dim, out_features, dim, generator, scale=3.0)
    y[0] = 1e3  # a row far from every expert: responsibilities decided by round-off-free tails
    curvature = softmax_curvature(num_experts - 1, bound)
    surrogate = GaussianExpertSurrogate()
    expected, expected_log_lik = mixture_statistics(
        surrogate, params, *model.features(x), y, curvature, 1e-6
    )
    fused = fused_statistics_for(model, surrogate)
    stats, log_lik, probe = fused(params, model.regressors_and_outputs(x, y), curvature, 1e-6)
    assert torch.allclose(log_lik, expected_log_lik, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(probe)
    for got, want in zip(tree_leaves(stats), tree_leaves(expected)):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def _in_chunks_of_16_rows(monkeypatch):
    """Chunks of 16 rows in :mod:`~pyro_mm.surrogates.moments` instead of the ~10^3 of a real
    batch."""
    monkeypatch.setattr(moments, "CHUNK_BYTES", 1)
    monkeypatch.setattr(moments, "MIN_CHUNK_ROWS", 16)


@pytest.mark.parametrize("chunked", [False, True])
def test_weighted_moments_equal_the_plain_product_in_either_layout(monkeypatch, chunked):
    if chunked:
        _in_chunks_of_16_rows(monkeypatch)  # 90 rows: five chunks and a ragged one
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(90, 6, generator=generator, dtype=torch.float64)
    weights = torch.rand(3, 90, generator=generator, dtype=torch.float64)
    expected = torch.stack([(rows * w[:, None]).T @ rows for w in weights])
    for design in (rows.T, rows.T.contiguous()):  # row-major view, feature-major copy
        assert torch.allclose(weighted_moments(weights, design), expected, rtol=1e-12)
    assert torch.allclose(weighted_gram(weights.T, rows), expected / 90, rtol=1e-12)
    assert torch.allclose(weighted_outer_products(weights.T, rows), expected, rtol=1e-12)


@pytest.mark.parametrize("num_experts, bound", [(4, "bohning"), (2, "jaakkola-jordan")])
def test_one_pass_statistics_in_chunks_of_rows_equal_the_block_by_block_statistics(
    monkeypatch, num_experts, bound
):
    generator = torch.Generator().manual_seed(3)
    model = GaussianMoE(num_experts, 3, 2).double()
    x = torch.randn(90, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(90, 2, generator=generator, dtype=torch.float64)
    params = random_gaussian_params(num_experts, 4, 2, 4, generator, scale=2.0)
    curvature = softmax_curvature(num_experts - 1, bound)
    design = model.regressors_and_outputs(x, y)
    surrogate = GaussianExpertSurrogate()
    # The block-by-block statistics in one piece, the one-pass ones in chunks.
    expected, _ = mixture_statistics(surrogate, params, *model.features(x), y, curvature, 1e-6)
    _in_chunks_of_16_rows(monkeypatch)
    stats, _, _ = fused_statistics_for(model, surrogate)(params, design, curvature, 1e-6)
    for got, want in zip(tree_leaves(stats), tree_leaves(expected)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_one_pass_statistics_are_used_only_where_they_apply():
    surrogate = GaussianExpertSurrogate()
    assert fused_statistics_for(GaussianMoE(2, 3), surrogate) is not None
    assert fused_statistics_for(GaussianMoE(1, 3), surrogate) is None
    assert fused_statistics_for(GaussianMoE(2, 3, gate_degree=2), surrogate) is None
    assert fused_statistics_for(MultinomialMoE(2, 3, 3), MultinomialExpertSurrogate()) is None


@pytest.mark.parametrize("bound", ["bohning", "jaakkola-jordan"])
def test_incremental_mm_with_one_pass_statistics_follows_the_block_by_block_iteration(bound):
    from pyro_mm import IncrementalMM
    from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe

    truth = gaussian_moe_truth(2, 4, 2, gate_norm=3.0, noise_std=0.5, seed=3)
    x, y = sample_gaussian_moe(truth, 2_000, seed=4)
    fits = []
    for fused in (True, False):
        infer = IncrementalMM(GaussianMoE(2, 4, 2), gate_bound=bound)
        assert infer._fused_statistics is not None
        if not fused:
            infer._fused_statistics = None
        losses = [infer.step(x[i : i + 100], y[i : i + 100]) for i in range(0, 2_000, 100)]
        fits.append((losses, infer.params))
    (losses, params), (expected_losses, expected_params) = fits
    assert max(abs(a - b) for a, b in zip(losses, expected_losses)) < 1e-10
    for got, want in zip(tree_leaves(params), tree_leaves(expected_params)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)
