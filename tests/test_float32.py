"""Where float32 statistics are safe (standardised inputs: the fit agrees with float64 to ~1e-5)
and where they are not (inputs far from zero: the Gram matrices' condition number eats float32's
seven digits and the fit is wrong; IncrementalMM warns at the first step)."""

import warnings

import pytest
import torch

from pyro_mm import GaussianMoE, IncrementalMM
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.metrics import parameter_error
from pyro_mm.models.params import GaussianExpertParams, MoEParams, tree_leaves, tree_to

NUM_ROWS, BATCH = 20_000, 500


def _shifted(truth: MoEParams, offset: float) -> MoEParams:
    """The same model for inputs ``x + offset``: intercepts absorb the shift."""
    gate = truth.gate.clone()
    weight = truth.experts.weight.clone()
    gate[:, 0] -= offset * gate[:, 1:].sum(-1)
    weight[..., 0] -= offset * weight[..., 1:].sum(-1)
    return MoEParams(gate, GaussianExpertParams(weight, truth.experts.variance.clone()))


def _fit(dtype, x, y, start: MoEParams) -> IncrementalMM:
    model = GaussianMoE(2, 10).double()
    model.set_params(start)
    infer = IncrementalMM(model, init="current", dtype=dtype)
    for first in range(0, NUM_ROWS, BATCH):
        infer.step(x[first : first + BATCH].to(dtype), y[first : first + BATCH].to(dtype))
    return infer


def _start(truth: MoEParams) -> MoEParams:
    """The truth, perturbed: the fit has real work to do."""
    generator = torch.Generator().manual_seed(0)
    return MoEParams(
        gate=truth.gate + 0.3 * torch.randn(truth.gate.shape, generator=generator).double(),
        experts=GaussianExpertParams(
            weight=truth.experts.weight
            + 0.3 * torch.randn(truth.experts.weight.shape, generator=generator).double(),
            variance=1.3 * truth.experts.variance,
        ),
    )


@pytest.fixture(scope="module")
def data():
    truth = gaussian_moe_truth(2, 10, seed=0)
    x, y = sample_gaussian_moe(truth, NUM_ROWS, seed=1)
    return truth, x, y


def test_float32_agrees_with_float64_on_standardised_inputs(data):
    truth, x, y = data
    start = _start(truth)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # well-conditioned: no warning in either dtype
        double, single = _fit(torch.float64, x, y, start), _fit(torch.float32, x, y, start)
    assert all(t.dtype == torch.float32 for t in tree_leaves(single.params))
    difference = max(
        float((a - b.double()).abs().max())
        for a, b in zip(tree_leaves(double.params), tree_leaves(single.params), strict=True)
    )
    assert difference < 1e-4, difference
    assert abs(double.evaluate_loss(x, y) - single.evaluate_loss(x.float(), y.float())) < 1e-5
    assert parameter_error(tree_to(single.params, torch.float64), truth)["total"] < 0.05


def test_float32_is_unsafe_for_inputs_far_from_zero(data):
    """Inputs shifted by 100: the Gram matrix [1, x + 100] has condition number ~1e10."""
    truth, x, y = data
    shifted_truth = _shifted(truth, 100.0)
    start = _start(truth)
    start = _shifted(start, 100.0)
    with pytest.warns(RuntimeWarning, match="condition number 1.0e\\+10"):
        single = _fit(torch.float32, x + 100.0, y, start)
    double = _fit(torch.float64, x + 100.0, y, start)
    assert parameter_error(double.params, shifted_truth)["total"] < 0.05
    assert parameter_error(tree_to(single.params, torch.float64), shifted_truth)["total"] > 1.0
    assert (
        single.evaluate_loss((x + 100.0).float(), y.float())
        > double.evaluate_loss(x + 100.0, y) + 0.5
    )
