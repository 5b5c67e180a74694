"""Truncation of the running statistics on expanding compact sets: a stream with gross outliers
throws plain incremental MM to infinity (or to an overflow), and stays finite with truncation;
on a stable stream truncation changes nothing."""

import math

import pytest
import torch

from pyro_mm import GaussianMoE, IncrementalMM
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.infer.stability import StatisticsTruncation, TruncationState
from pyro_mm.models.params import GaussianExpertParams, MoEParams, tree_leaves

TRUTH = gaussian_moe_truth(2, 2, 1, seed=0)


def _start():
    """A fixed start near (not at) the truth, so that no K-means run is needed."""
    return MoEParams(
        gate=TRUTH.gate + 0.3,
        experts=GaussianExpertParams(
            weight=TRUTH.experts.weight + 0.3, variance=TRUTH.experts.variance * 2
        ),
    )


def _run(stability, outlier_scale=None, steps=60, centre_regressors="auto"):
    model = GaussianMoE(2, 2).double()
    model.set_params(_start())
    infer = IncrementalMM(
        model, init="current", stability=stability, centre_regressors=centre_regressors
    )
    for i in range(steps):
        x, y = sample_gaussian_moe(TRUTH, 50, seed=i)
        if outlier_scale is not None and i in (20, 40):
            # One row of the batch with a gross error in its inputs (a sensor glitch).
            x = x.clone()
            x[0] *= outlier_scale
        infer.step(x, y)
    return infer


def _heldout_nll(infer):
    x, y = sample_gaussian_moe(TRUTH, 2000, seed=999)
    return infer.evaluate_loss(x, y)


def test_outliers_throw_plain_incremental_mm_to_infinity_and_truncation_keeps_it_finite():
    plain = _run(None, 1e50)
    assert plain.params.gate.abs().max() > 1e100  # finite only because float64 is wide
    with pytest.raises(FloatingPointError):
        _run(None, 1e150)
    clean = _heldout_nll(_run(None))
    for scale in (1e50, 1e150):
        truncated = _run(StatisticsTruncation(), scale)
        assert all(bool(torch.isfinite(t).all()) for t in tree_leaves(truncated.params))
        assert truncated.params.gate.abs().max() < 10
        assert truncated.regularisation["truncations"] == 2
        assert _heldout_nll(truncated) < clean + 0.1
    assert _heldout_nll(plain) > clean + 0.5


def test_truncation_changes_nothing_on_a_stable_stream():
    # A truncated iteration is not centred (its sets are in the statistics' coordinates): the
    # plain one it is compared with runs in the same, the model's.
    plain = _run(None, steps=30, centre_regressors=False)
    truncated = _run(StatisticsTruncation(), steps=30)
    assert truncated.centring is None
    assert truncated.regularisation["truncations"] == 0
    for a, b in zip(tree_leaves(plain.params), tree_leaves(truncated.params)):
        assert torch.equal(a, b)


def test_project_resets_to_the_reference_and_expands_the_sets():
    truncation = StatisticsTruncation(radius=10.0, growth=3.0)
    reference = MoEParams(gate=torch.tensor([[2.0, -0.5]]), experts=torch.tensor([0.1]))
    stats, state = truncation.project(reference, None)
    assert stats is reference and state.count == 0
    assert truncation.bounds(state) == [20.0, 10.0]
    inside = MoEParams(gate=torch.tensor([[19.0, 0.0]]), experts=torch.tensor([-9.0]))
    assert truncation.project(inside, state) == (inside, state)
    for outside in (
        MoEParams(gate=torch.tensor([[21.0, 0.0]]), experts=torch.tensor([0.0])),
        MoEParams(gate=torch.tensor([[0.0, math.nan]]), experts=torch.tensor([0.0])),
        MoEParams(gate=torch.tensor([[0.0, 0.0]]), experts=torch.tensor([math.inf])),
    ):
        stats, new_state = truncation.project(outside, state)
        assert stats is reference and new_state.count == 1
    assert truncation.bounds(TruncationState(count=2, reference=reference)) == [180.0, 90.0]


def test_truncation_state_is_checkpointed():
    infer = _run(StatisticsTruncation(), 1e50, steps=25)
    state = infer.state_dict()
    model = GaussianMoE(2, 2).double()
    resumed = IncrementalMM(model, init="current", stability=StatisticsTruncation())
    resumed.load_state_dict(state)
    assert resumed.stability_state.count == 1
    with pytest.raises(ValueError):
        IncrementalMM(GaussianMoE(2, 2).double()).load_state_dict(state)


def test_bad_truncation_options_are_named():
    with pytest.raises(ValueError, match="radius"):
        StatisticsTruncation(radius=1.0)
    with pytest.raises(ValueError, match="growth"):
        StatisticsTruncation(growth=0.5)
