"""The paper's synthetic setups (Sections 5.2 and 5.3) as written down in the generator."""

import numpy as np
import pytest
import torch

from pyro_mm import GaussianMoE
from pyro_mm.datasets.paper_synthetic import (
    algorithm4_truth,
    from_paper_layout,
    low_dimensional_truth,
    paper_synthetic,
)
from pyro_mm.metrics import evaluate_fit, regression_errors


def test_low_dimensional_truth_is_the_papers_section_5_2():
    truth = low_dimensional_truth()
    assert torch.equal(truth.gate, torch.tensor([[0.0, 8.0, 0.0]], dtype=torch.float64))
    assert torch.equal(
        truth.experts.weight,
        torch.tensor([[[0.0, 0.0, 0.0]], [[-2.5, 0.0, 0.0]]], dtype=torch.float64),
    )
    assert torch.equal(truth.experts.variance, torch.ones(2, 1, dtype=torch.float64))


def test_algorithm4_follows_the_papers_seeds_and_signs():
    seed, num_experts, out_features, in_features = 3, 3, 2, 10
    truth = algorithm4_truth(num_experts, in_features, out_features, seed=seed)
    for k in range(1, num_experts + 1):
        for q in range(1, out_features + 1):
            expected = np.random.RandomState(seed + k * out_features + q).uniform(0.5, 1.5)
            assert truth.experts.variance[k - 1, q - 1].item() == expected
            for d in (0, 1):
                draw = seed + seed + k * 2 * out_features * in_features
                draw += d * out_features * in_features + q * in_features + 1
                value = np.random.RandomState(draw).uniform(1.5, 5.0)
                sign = -1.0 if (k > 1 and d > 0) else 1.0
                # column 0: intercept (summed over p: only p = 1 is non-zero); column 1: x_1
                assert truth.experts.weight[k - 1, q - 1, d].item() == sign * value
    # every coefficient of x_2 .. x_P is zero, in the experts and in the gate
    assert (truth.experts.weight[:, :, 2:] == 0).all()
    expected_gate = torch.zeros(num_experts - 1, in_features + 1, dtype=torch.float64)
    expected_gate[0, 1] = 8.0
    assert torch.equal(truth.gate, expected_gate)
    with pytest.raises(ValueError, match="K >= 2"):
        algorithm4_truth(num_experts=1)


def test_paper_layout_sums_the_per_coordinate_intercepts():
    omega = np.zeros((2, 2, 2))
    omega[:, 0, 0] = [0.5, 1.5]  # the paper's intercept of expert 1, one per coordinate
    omega[:, 0, 1] = [2.0, -3.0]
    upsilon = np.zeros((2, 2, 1, 2))
    upsilon[1, 0, 0] = [1.0, 2.0]
    upsilon[1, 1, 0] = [4.0, 5.0]
    sigma = np.stack([np.eye(1) * 0.3, np.eye(1) * 0.7])
    params = from_paper_layout(omega, upsilon, sigma)
    assert params.gate.tolist() == [[2.0, 2.0, -3.0]]
    assert params.experts.weight[1, 0].tolist() == [3.0, 4.0, 5.0]
    assert params.experts.variance.flatten().tolist() == [0.3, 0.7]
    # the same regression function as the paper's per-coordinate form
    x = torch.tensor([[0.2, -1.0]], dtype=torch.float64)
    paper_logit = sum(omega[p, 0, 0] + omega[p, 0, 1] * x[0, p].item() for p in range(2))
    ours = GaussianMoE(2, 2).double().gate_probs(x, params)[0, 0]
    assert ours.item() == pytest.approx(1 / (1 + np.exp(-paper_logit)))
    bad = omega.copy()
    bad[0, 1, 0] = 1.0
    with pytest.raises(ValueError, match="reference expert"):
        from_paper_layout(bad, upsilon, sigma)
    with pytest.raises(ValueError, match="diagonal"):
        from_paper_layout(omega, upsilon, np.ones((2, 2, 2)))


@pytest.mark.parametrize("setup, num_features", [("low", 2), ("high", 10)])
def test_paper_synthetic_draws_2x1000_rows_split_80_20_reproducibly(setup, num_features):
    data = paper_synthetic(setup, seed=4)
    assert data.x_train.shape == (1600, num_features) and data.y_train.shape == (1600, 1)
    assert data.x_test.shape == (400, num_features) and data.y_test.shape == (400, 1)
    again = paper_synthetic(setup, seed=4)
    assert torch.equal(data.y_test, again.y_test)
    assert not torch.equal(data.y_test, paper_synthetic(setup, seed=5).y_test)
    # about 1000 rows per expert (the paper's "two clusters of 1000")
    gate = GaussianMoE(2, num_features).double().gate_probs(data.x_train, data.truth)
    assert abs(gate[:, 0].mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="setup"):
        paper_synthetic("medium")


def test_evaluate_fit_at_the_truth_has_zero_estimation_and_parameter_error():
    data = paper_synthetic("low", seed=0)
    model = GaussianMoE(2, 2).double()
    model.set_params(data.truth)
    report = evaluate_fit(model, data.x_test, data.y_test, data.truth)
    assert report["estimation_mse"] == 0.0 and report["parameter_error"] == 0.0
    mean = model.predict(data.x_test)
    assert report["prediction_mse"] == pytest.approx(
        (mean - data.y_test).square().mean().item(), rel=1e-12
    )
    assert report["heldout_nll"] == pytest.approx(
        -model.log_prob(data.x_test, data.y_test).mean().item(), rel=1e-12
    )
    errors = regression_errors(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0]))
    assert errors == pytest.approx({"mse": 1.0, "mape": (0.5 + 0.25) / 2, "nrmse": 0.5})


def test_parameter_error_refuses_fits_it_cannot_match():
    # A K = 3 fit against a K = 2 truth used to get numbers (matched on whatever rows existed),
    # and another expert family a bare distance error.
    from pyro_mm.metrics import parameter_error
    from pyro_mm.models import FullCovarianceGaussianMoE

    truth = GaussianMoE(2, 2).double().get_params()
    with pytest.raises(ValueError, match=r"shapes .* differ .*voronoi_loss"):
        parameter_error(GaussianMoE(3, 2).double().get_params(), truth)
    with pytest.raises(ValueError, match="FullCovarianceExpertParams experts and the truth"):
        parameter_error(FullCovarianceGaussianMoE(2, 2, 1).double().get_params(), truth)
    assert parameter_error(truth, truth)["total"] == 0.0
