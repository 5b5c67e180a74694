"""Where float32 statistics are safe (standardised inputs: the fit agrees with float64 to ~1e-5;
inputs far from zero too, since IncrementalMM centres the regressors) and where they are not
(inputs far from zero with ``centre_regressors=False``: the Gram matrices' condition number eats
float32's seven digits and the fit is wrong; IncrementalMM warns at the first step).

Measured on this generator (K=2, P=10, 20k rows, batch 500), loss of the float32 fit minus that of
the float64 fit: 2e-5 nats for x shifted by 30, 1e-3 by 100, 0.64 by 300, 1.4 by 1000; by 3000
float32 raises FloatingPointError (overflowing statistics). float64 is unaffected up to ~100.
How much float32 loses depends on the processor's round-off: on an AVX-512 machine (MKL) the
same fits lost 0.0017 nats by 100, 0.097 by 300, 0.90 by 500 and 1.07 by 1000, and by 3000 the
batch's log-likelihood overflowed (ValueError).
Those are the uncentred iteration's figures; centred (the default), float32 ended within 2e-5
nats of float64 for every shift up to 1e4, and float64 within 3e-14 of the unshifted fit.
"""

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


def _fit(dtype, x, y, start: MoEParams, centre_regressors: bool = True) -> IncrementalMM:
    model = GaussianMoE(2, 10).double()
    model.set_params(start)
    infer = IncrementalMM(model, init="current", dtype=dtype, centre_regressors=centre_regressors)
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


def test_uncentred_float32_is_unsafe_for_inputs_far_from_zero(data):
    """Inputs shifted by 500, the iteration in the model's coordinates: the Gram matrix of
    [1, x + 500] is far too ill-conditioned for float32's seven digits; float64 still fits (its
    loss is within 0.01 nats of the unshifted fit's: +0.0049 on an AVX-512 machine), float32 is
    more than half a nat worse (0.90 there), and the first step warns. The shift was 300 until
    that machine: there float32 lost only 0.097 nats at 300 (0.64 on the machines before), so
    the test takes the shift at which the failure is large on both."""
    truth, x, y = data
    start = _shifted(_start(truth), 500.0)
    with pytest.warns(RuntimeWarning, match=r"condition number \d\.\de\+1[0-3] .*or use float64"):
        single = _fit(torch.float32, x + 500.0, y, start, centre_regressors=False)
    double = _fit(torch.float64, x + 500.0, y, start, centre_regressors=False)
    double_loss = double.evaluate_loss(x + 500.0, y)
    assert double_loss < _fit(torch.float64, x, y, _start(truth)).evaluate_loss(x, y) + 0.01
    assert single.evaluate_loss((x + 500.0).float(), y.float()) > double_loss + 0.5


@pytest.mark.parametrize("offset", [300.0, 3000.0])
def test_centred_regressors_make_inputs_far_from_zero_safe_in_either_dtype(data, offset):
    """The same shifted inputs with the default centred iteration: no warning, float64 gives the
    unshifted fit's loss and float32 agrees with it (uncentred, float32 was 0.64 nats worse at a
    shift of 300 and raised FloatingPointError at 3000; on an AVX-512 machine 0.097 nats and a
    ValueError for the overflowing log-likelihood)."""
    truth, x, y = data
    start = _shifted(_start(truth), offset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = _fit(torch.float32, x + offset, y, start)
        double = _fit(torch.float64, x + offset, y, start)
    unshifted = _fit(torch.float64, x, y, _start(truth)).evaluate_loss(x, y)
    assert abs(double.evaluate_loss(x + offset, y) - unshifted) < 1e-10
    assert abs(single.evaluate_loss((x + offset).float(), y.float()) - unshifted) < 1e-4
