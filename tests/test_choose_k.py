"""Choosing K by BIC and PSIS-LOO: both pick the true number of experts on well-separated data,
BIC's parameter count is right (also for full covariances), and bad input is named."""

import math
import warnings

import pytest
import torch

from pyro_mm import GaussianMoE, MultinomialMoE
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.diagnostics.choose_k import (
    choose_num_experts,
    num_free_parameters,
    pareto_k_threshold,
)
from pyro_mm.models import FullCovarianceGaussianMoE


def test_bic_and_loo_pick_the_true_number_of_experts():
    truth = gaussian_moe_truth(2, 1, 1, gate_norm=4.0, noise_std=0.3, seed=0)
    x, y = sample_gaussian_moe(truth, 400, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection = choose_num_experts(lambda k: GaussianMoE(k, 1).double(), x, y, [1, 2, 3])
    # With the default 500 draws the estimates are reliable and the fits clean: nothing to
    # report (with 100 draws ArviZ's own threshold, 1 - 1 / log10(100) = 0.5, flags all three).
    assert not [w for w in caught if "choose_num_experts" in str(w.message)]
    limit = pareto_k_threshold(500)
    assert math.isclose(limit, 1 - 1 / math.log10(500)) and pareto_k_threshold(10**4) == 0.7
    assert all(row["max_pareto_k"] <= limit and not row["warnings"] for row in selection.table)
    assert selection.best_bic == 2
    assert selection.best_loo == 2
    rows = {row["num_experts"]: row for row in selection.table}
    # BIC from its definition; the one-expert model is far worse on both criteria.
    for k, row in rows.items():
        nll = -selection.models[k].log_prob(x, y).sum().item()
        assert math.isclose(row["bic"], 2 * nll + row["num_parameters"] * math.log(400))
    assert rows[1]["elpd_loo"] < rows[2]["elpd_loo"] - 100  # measured: about 210 nats
    assert rows[2]["bic"] < rows[3]["bic"] < rows[1]["bic"]
    comparison = selection.compare()
    assert comparison.index[0] == "K=2" or comparison.loc["K=2", "elpd_diff"] < (
        2 * comparison.loc["K=2", "dse"]
    )


def test_unreliable_loo_and_warnings_kept_in_the_table_are_reported():
    """Separable classes: the fit's Hessian is flat, the Laplace posterior huge and PSIS-LOO
    meaningless; a user reading only best_loo is told so in one warning naming the K."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    with pytest.warns(RuntimeWarning, match="choose_num_experts") as caught:
        selection = choose_num_experts(
            lambda k: MultinomialMoE(k, 1, 2).double(), x, y, [1], num_samples=100
        )
    message = [str(w.message) for w in caught if "choose_num_experts" in str(w.message)][0]
    assert selection.table[0]["max_pareto_k"] > 0.5 and selection.table[0]["warnings"]
    assert "PSIS-LOO is unreliable (Pareto k above 0.5)" in message
    assert "K = 1 (max Pareto k" in message
    assert "fitting or scoring K = 1 raised warnings" in message


def test_free_parameter_counts():
    # Gate (K-1) D_g + weights K Q D_e + variances K Q.
    assert num_free_parameters(GaussianMoE(3, 2, 2)) == 2 * 3 + 3 * 2 * 3 + 3 * 2
    # A Q x Q covariance counts Q (Q + 1) / 2.
    assert num_free_parameters(FullCovarianceGaussianMoE(3, 2, 2)) == 2 * 3 + 3 * 2 * 3 + 3 * 3


def test_bad_candidates_and_criteria_are_named():
    x = torch.randn(20, 1, dtype=torch.float64)
    y = torch.randn(20, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive integers"):
        choose_num_experts(lambda k: GaussianMoE(k, 1), x, y, [0, 2])
    with pytest.raises(ValueError, match="distinct"):
        choose_num_experts(lambda k: GaussianMoE(k, 1), x, y, [2, 2])
    with pytest.raises(ValueError, match="criteria"):
        choose_num_experts(lambda k: GaussianMoE(k, 1), x, y, [2], criteria=("aic",))
    with pytest.raises(TypeError, match="make_model"):
        choose_num_experts(lambda k: GaussianMoE(2, 1), x, y, [3], criteria=("bic",))
