import pyro
import pytest
import torch

from pyro_mm import GaussianMoE, GradientEM, MultinomialMoE
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.datasets.synthetic import multinomial_moe_truth, sample_multinomial_moe
from pyro_mm.models.params import GaussianExpertParams, MoEParams, tree_leaves


def _problem(seed=0, num_samples=600):
    truth = gaussian_moe_truth(3, 2, 2, seed=seed)
    x, y = sample_gaussian_moe(truth, num_samples, seed=seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    start = MoEParams(
        gate=truth.gate
        + 0.5 * torch.randn(truth.gate.shape, generator=generator, dtype=torch.float64),
        experts=GaussianExpertParams(
            weight=truth.experts.weight
            + 0.3
            * torch.randn(truth.experts.weight.shape, generator=generator, dtype=torch.float64),
            variance=1.5 * truth.experts.variance,
        ),
    )
    return x, y, start


def _model_at(params):
    model = GaussianMoE(3, 2, 2).double()
    model.set_params(params)
    return model


def test_equal_step_sizes_are_pyro_svi_with_sgd_on_the_same_model():
    """grad_theta Q(theta | theta_t) at theta_t is grad L(theta_t): gradient EM with one step size
    is gradient descent on the mean NLL in Pyro's unconstrained coordinates."""
    x, y, start = _problem(seed=1)
    lr = 0.3
    gem = GradientEM(_model_at(start), lr_gate=lr, lr_experts=lr, init="current")
    reference = _model_at(start)
    svi = pyro.infer.SVI(
        reference,
        lambda x, y: None,
        pyro.optim.SGD({"lr": lr / len(x)}),  # Trace_ELBO sums over the data
        pyro.infer.Trace_ELBO(),
    )
    for _ in range(3):
        loss = gem.step(x, y)
        assert svi.step(x, y) / len(x) == pytest.approx(loss, abs=1e-12)
        differences = [
            (a - b).abs().max().item()
            for a, b in zip(tree_leaves(gem.params), tree_leaves(reference.get_params()))
        ]
        assert max(differences) < 1e-10
    assert (gem.params.gate - start.gate).abs().max() > 1e-3


def test_each_block_moves_along_its_own_nll_gradient():
    x, y, start = _problem(seed=3)
    lr_gate, lr_experts = 0.8, 0.05
    gem = GradientEM(_model_at(start), lr_gate, lr_experts, init="current")
    gem.step(x, y)
    gate = start.gate.clone().requires_grad_(True)
    weight = start.experts.weight.clone().requires_grad_(True)
    log_variance = start.experts.variance.log().requires_grad_(True)
    params = MoEParams(gate, GaussianExpertParams(weight=weight, variance=log_variance.exp()))
    nll = -gem.model.log_prob(x, y, params).mean()
    grad_gate, grad_weight, grad_log_variance = torch.autograd.grad(
        nll, [gate, weight, log_variance]
    )
    assert (gem.params.gate - (start.gate - lr_gate * grad_gate)).abs().max() < 1e-12
    expected_weight = start.experts.weight - lr_experts * grad_weight
    assert (gem.params.experts.weight - expected_weight).abs().max() < 1e-12
    expected_log_variance = start.experts.variance.log() - lr_experts * grad_log_variance
    assert (gem.params.experts.variance.log() - expected_log_variance).abs().max() < 1e-12


def test_small_steps_decrease_the_nll():
    x, y, start = _problem(seed=5)
    gem = GradientEM(_model_at(start), lr_gate=0.5, lr_experts=0.05, init="current")
    history = gem.fit(x, y, epochs=40, progress=False)
    losses = history.loss + [gem.evaluate_loss(x, y)]
    assert len(history) == 40 and gem.num_steps == 40
    assert torch.tensor(losses).diff().max() < 0
    assert losses[-1] < losses[0] - 0.05


def test_gradient_em_fits_multinomial_experts_too():
    truth = multinomial_moe_truth(2, 2, 3, seed=0)
    x, y = sample_multinomial_moe(truth, 800, seed=1)
    gem = GradientEM(MultinomialMoE(2, 2, 3), lr_gate=0.5, lr_experts=0.5)
    losses = [gem.step(x, y) for _ in range(15)] + [gem.evaluate_loss(x, y)]
    assert torch.tensor(losses).diff().max() < 0


def test_bad_input_is_rejected_before_any_state_change():
    x, y, start = _problem(seed=7, num_samples=200)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "fast", True):
        with pytest.raises(ValueError, match="lr_gate"):
            GradientEM(GaussianMoE(3, 2, 2), lr_gate=bad, lr_experts=0.1)
    with pytest.raises(ValueError, match="lr_experts"):
        GradientEM(GaussianMoE(3, 2, 2), lr_gate=0.1, lr_experts=-0.1)
    with pytest.raises(ValueError, match="batch_size"):
        GradientEM(GaussianMoE(3, 2, 2), 0.1, 0.1, batch_size=0)
    gem = GradientEM(_model_at(start), 0.1, 0.1, init="current")
    gem.step(x, y)
    before = [t.clone() for t in tree_leaves(gem.params)]
    bad_y = y.clone()
    bad_y[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gem.step(x, bad_y)
    with pytest.raises(ValueError, match="shape"):
        gem.step(x, y[:, :1])
    assert gem.num_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tree_leaves(gem.params)))
