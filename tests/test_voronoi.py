"""Voronoi losses: zero at the truth (also over-specified), linear in singleton cells, quadratic in
cells of several atoms, and blind to relabelling and to the gate's reference."""

import math

import pytest
import torch
from helpers import random_gaussian_params

from pyro_mm.metrics_voronoi import mixing_measure, voronoi_loss
from pyro_mm.models.params import GaussianExpertParams, MoEParams


def _truth(seed=0, num_experts=3):
    generator = torch.Generator().manual_seed(seed)
    return random_gaussian_params(num_experts, 3, 2, 3, generator, scale=1.0)


def _full_gate(params):
    return torch.nn.functional.pad(params.gate, (0, 0, 0, 1))


def _from_full_gate(full_gate, weight, variance):
    """Parameters with the last of ``full_gate``'s rows as the reference expert."""
    return MoEParams(
        gate=full_gate[:-1] - full_gate[-1],
        experts=GaussianExpertParams(weight=weight, variance=variance),
    )


def _split(truth, atom, fractions):
    """``truth`` with atom ``atom`` split into atoms of the same parameters and weights
    ``fractions`` of its own (an exact over-specified representation of the same model)."""
    full = _full_gate(truth)
    rows, weights, variances = [], [], []
    for i in range(full.shape[0]):
        copies = fractions if i == atom else [1.0]
        for fraction in copies:
            row = full[i].clone()
            row[0] += math.log(fraction)
            rows.append(row)
            weights.append(truth.experts.weight[i])
            variances.append(truth.experts.variance[i])
    return _from_full_gate(torch.stack(rows), torch.stack(weights), torch.stack(variances))


def test_same_model_is_the_same_measure():
    truth = _truth()
    split = _split(truth, 1, [0.3, 0.7])
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = torch.cat([torch.ones(50, 1, dtype=torch.float64), x], -1)
    # The split model has the same gate mass on each expert's parameters at every x.
    probs = torch.softmax(u @ _full_gate(truth).T, -1)
    split_probs = torch.softmax(u @ _full_gate(split).T, -1)
    merged = torch.stack([split_probs[:, 0], split_probs[:, 1] + split_probs[:, 2]], -1)
    assert torch.allclose(merged, probs[:, :2], atol=1e-12)
    measure = mixing_measure(truth)
    assert abs(torch.logsumexp(measure.log_weight, 0).item()) < 1e-12
    assert torch.allclose(measure.log_weight.exp() @ measure.gate_slope, torch.zeros(2).double())


def test_zero_at_the_truth_and_at_an_exact_over_specified_fit():
    truth = _truth()
    at_truth = voronoi_loss(truth, truth)
    assert at_truth["total"] < 1e-12 and at_truth["cells"] == [[0], [1], [2]]
    over = voronoi_loss(_split(truth, 1, [0.25, 0.75]), truth)
    assert over["total"] < 1e-12
    assert over["cells"] == [[0], [1, 2], [3]]
    assert voronoi_loss(_split(truth, 2, [0.1, 0.2, 0.7]), truth)["total"] < 1e-12


def test_invariant_to_relabelling_and_reference_choice():
    truth = _truth(seed=3, num_experts=4)
    generator = torch.Generator().manual_seed(5)
    estimate = random_gaussian_params(6, 3, 2, 3, generator, scale=1.0)
    base = voronoi_loss(estimate, truth)
    assert base["total"] > 0.1
    for seed in range(4):
        order = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        full = _full_gate(estimate)[order]
        # A different expert becomes the reference, and every gate row is shifted by a constant.
        shifted = full + torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
        relabelled = _from_full_gate(
            shifted, estimate.experts.weight[order], estimate.experts.variance[order]
        )
        again = voronoi_loss(relabelled, truth)
        assert math.isclose(again["total"], base["total"], rel_tol=1e-12)
        assert sorted(map(len, again["cells"])) == sorted(map(len, base["cells"]))


def test_singleton_cell_is_linear_in_the_parameter_gap():
    truth = _truth()
    weights = mixing_measure(truth).log_weight.exp()
    for gap in (1e-1, 1e-2, 1e-3):
        estimate = _truth()
        estimate.experts.weight[1, 0, 0] += gap
        loss = voronoi_loss(estimate, truth)
        assert loss["over_specified"] == 0 and loss["mass"] < 1e-12
        assert math.isclose(loss["exact"], weights[1].item() * gap, rel_tol=1e-9)


def test_multi_atom_cell_is_quadratic_in_the_parameter_gap():
    truth = _truth()
    weights = mixing_measure(truth).log_weight.exp()
    for gap in (1e-1, 1e-2, 1e-3):
        estimate = _split(truth, 1, [0.4, 0.6])
        # Expert gaps of norm ``gap`` in both atoms of the over-specified cell (gate unchanged).
        estimate.experts.weight[1, 0, 0] += gap
        estimate.experts.variance[2, 1] -= gap
        loss = voronoi_loss(estimate, truth)
        assert loss["exact"] < 1e-12 and loss["mass"] < 1e-12
        assert math.isclose(loss["over_specified"], weights[1].item() * gap**2, rel_tol=1e-9)
        # Exponent r in every cell (the loss for linear experts).
        cubic = voronoi_loss(estimate, truth, exponent=3)
        assert math.isclose(cubic["over_specified"], weights[1].item() * gap**3, rel_tol=1e-9)


def test_mass_term_counts_the_cell_weight_mismatch():
    truth = _truth()
    true_weights = mixing_measure(truth).log_weight.exp()
    estimate = _split(truth, 1, [0.4, 0.6])
    estimate.gate[1, 0] += math.log(2.0)  # atom 1 (the first half of the split) doubles
    loss = voronoi_loss(estimate, truth)
    fitted_weights = mixing_measure(estimate).log_weight.exp()
    expected = sum(
        abs(fitted_weights[cell].sum().item() - true_weights[j].item())
        for j, cell in enumerate(loss["cells"])
    )
    assert loss["cells"] == [[0], [1, 2], [3]]
    assert loss["mass"] > 0.05 and math.isclose(loss["mass"], expected, rel_tol=1e-12)
    # Under-specified fits leave a true atom's cell empty: its whole weight counts as mass error.
    merged = MoEParams(
        gate=truth.gate[1:] - truth.gate[0],
        experts=GaussianExpertParams(truth.experts.weight[1:], truth.experts.variance[1:]),
    )
    under = voronoi_loss(merged, truth)
    empty = [j for j, cell in enumerate(under["cells"]) if not cell]
    assert len(empty) == 1 and under["mass"] >= true_weights[empty[0]].item() - 1e-12


def test_bad_input_is_named():
    truth = _truth()
    other = random_gaussian_params(3, 4, 2, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="features"):
        voronoi_loss(other, truth)
    with pytest.raises(ValueError, match="expert_fields"):
        voronoi_loss(truth, truth, expert_fields=("mean",))
    with pytest.raises(ValueError, match="exponent"):
        voronoi_loss(truth, truth, exponent=0.5)
    with pytest.raises(ValueError, match="intercept_column"):
        voronoi_loss(truth, truth, intercept_column=5)
