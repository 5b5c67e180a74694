import warnings

import pytest
import torch

from pyro_mm import EM, GaussianMoE, MirrorDescentEM, MultinomialMoE, PowerDecay
from pyro_mm.datasets import gaussian_moe_stream, gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.datasets.synthetic import multinomial_moe_truth, sample_multinomial_moe
from pyro_mm.models.gating import gate_log_probs
from pyro_mm.models.gaussian_moe import gaussian_expert_means
from pyro_mm.models.params import GaussianExpertParams, MoEParams, tree_leaves
from pyro_mm.surrogates import (
    GaussianExpertSurrogate,
    expert_surrogate_for,
    register_expert_surrogate,
)


class _SurrogateWithoutMeanStatistics:
    """A Gaussian expert block that does not expose its mean parameters."""

    def __init__(self, **options):
        self._block = GaussianExpertSurrogate(**options)

    def __getattr__(self, name):
        if name == "mean_statistics":
            raise AttributeError(name)
        return getattr(self._block, name)


class _MeanlessGaussianMoE(GaussianMoE):
    pass


register_expert_surrogate(_MeanlessGaussianMoE, _SurrogateWithoutMeanStatistics)


def _data(num_experts=3, in_features=2, out_features=1, num_samples=1500, seed=0):
    truth = gaussian_moe_truth(num_experts, in_features, out_features, seed=seed)
    x, y = sample_gaussian_moe(truth, num_samples, seed=seed + 1)
    return x, y


def _max_difference(a: MoEParams, b: MoEParams) -> float:
    return max((s - t).abs().max().item() for s, t in zip(tree_leaves(a), tree_leaves(b)))


def test_step_size_one_is_em_step_for_step():
    x, y = _data(3, 2, 2, seed=1)
    em = EM(GaussianMoE(3, 2, 2, gate_degree=2))
    md = MirrorDescentEM(GaussianMoE(3, 2, 2, gate_degree=2), step_size=1.0)
    for _ in range(8):
        assert md.step(x, y) == pytest.approx(em.step(x, y), abs=1e-12)
        assert _max_difference(md.params, em.params) < 1e-10
    assert md.num_steps == em.num_steps == 8


def _kl_complete_data(model, theta_t: MoEParams, theta: MoEParams, x):
    """avg_n KL(p_{theta_t}(y, z | x_n) || p_theta(y, z | x_n)) in closed form: the KL of the gate
    plus the gate-weighted KL of the Gaussian experts (an independent reference for the mean
    statistics used by MirrorDescentEM)."""
    u, r = model.features(x)
    log_gate_t, log_gate = gate_log_probs(theta_t.gate, u), gate_log_probs(theta.gate, u)
    gate_t = log_gate_t.exp()
    mean_t = gaussian_expert_means(theta_t.experts.weight, r)
    mean = gaussian_expert_means(theta.experts.weight, r)
    var_t, var = theta_t.experts.variance, theta.experts.variance
    expert_kl = 0.5 * (var.log() - var_t.log() + (var_t + (mean_t - mean) ** 2) / var - 1)
    per_row = (gate_t * (log_gate_t - log_gate)).sum(-1) + (gate_t * expert_kl.sum(-1)).sum(-1)
    return per_row.mean()


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_damped_step_is_the_kl_mirror_descent_step(eta):
    """theta_{t+1} = argmin eta Q(theta | theta_t) + (1 - eta) KL(p_{theta_t} || p_theta):
    the gradient of that objective vanishes at the new iterate."""
    x, y = _data(3, 2, 2, num_samples=1000, seed=3)
    model = GaussianMoE(3, 2, 2)
    md = MirrorDescentEM(model, step_size=eta, ridge=0.0)
    md.initialize(x, y)
    md.step(x, y)  # leave the K-means start
    theta_t = md.params
    resp = model.responsibilities(x, y, theta_t)
    md.step(x, y)
    theta_next = MoEParams(
        gate=md.params.gate.clone().requires_grad_(True),
        experts=GaussianExpertParams(
            weight=md.params.experts.weight.clone().requires_grad_(True),
            variance=md.params.experts.variance.clone().requires_grad_(True),
        ),
    )
    q_value = -(resp * model.log_joint(x, y, theta_next)).sum(-1).mean()
    objective = eta * q_value + (1 - eta) * _kl_complete_data(model, theta_t, theta_next, x)
    gradients = torch.autograd.grad(objective, tree_leaves(theta_next))
    assert max(g.abs().max().item() for g in gradients) < 1e-8
    # ... and it is a genuinely damped step: not the EM step.
    em = EM(GaussianMoE(3, 2, 2), init="current", ridge=0.0)
    em.model.set_params(theta_t)
    em.step(x, y)
    assert _max_difference(em.params, md.params) > 1e-3


def test_gate_mean_parameters_move_by_the_mirror_descent_rule():
    """avg g(x; W_{t+1}) u^T = (1 - eta) avg g(x; W_t) u^T + eta avg tau u^T."""
    eta = 0.4
    x, y = _data(3, 2, 1, num_samples=1200, seed=5)
    model = GaussianMoE(3, 2, 1, gate_degree=2)
    md = MirrorDescentEM(model, step_size=eta)
    md.initialize(x, y)
    u = model.gate_features(x)
    theta_t = md.params
    resp = model.responsibilities(x, y, theta_t)
    md.step(x, y)

    def mean_parameters(weights):
        return weights[:, :-1].T @ u / len(u)

    expected = (1 - eta) * mean_parameters(model.gate_probs(x, theta_t)) + eta * mean_parameters(
        resp
    )
    assert (mean_parameters(model.gate_probs(x, md.params)) - expected).abs().max() < 1e-10
    assert (mean_parameters(resp) - expected).abs().max() > 1e-3


def test_expert_mean_statistics_are_solved_back_to_the_experts():
    x, _ = _data(3, 2, 2, num_samples=500, seed=7)
    model = GaussianMoE(3, 2, 2)
    surrogate = expert_surrogate_for(model, ridge=0.0)
    generator = torch.Generator().manual_seed(0)
    experts = GaussianExpertParams(
        weight=torch.randn(3, 2, 3, generator=generator, dtype=torch.float64),
        variance=0.1 + torch.rand(3, 2, generator=generator, dtype=torch.float64),
    )
    gate = torch.softmax(torch.randn(500, 3, generator=generator, dtype=torch.float64), -1)
    stats = surrogate.mean_statistics(experts, model.expert_features(x), gate)
    solved, _ = surrogate.solve(stats, experts)
    assert _max_difference(solved, experts) < 1e-10


def test_damped_em_never_increases_the_nll_and_reaches_em_optimum():
    eta = 0.5
    x, y = _data(2, 2, 1, num_samples=600, seed=0)
    em = EM(GaussianMoE(2, 2), ridge=0.0)
    em.fit(x, y, tol=1e-12, max_iter=500, progress=False)
    optimum = em.evaluate_loss(x, y)
    md = MirrorDescentEM(GaussianMoE(2, 2), step_size=eta, ridge=0.0)
    history = md.fit(x, y, epochs=80, progress=False)
    losses = history.loss + [md.evaluate_loss(x, y)]
    assert torch.tensor(losses).diff().max() <= 1e-12
    assert losses[-1] - optimum < 1e-8
    # damping slows the first iterations down relative to EM
    assert history.loss[3] > em.history.loss[3]


def test_stochastic_mirror_descent_over_a_stream_approaches_the_truth():
    truth = gaussian_moe_truth(2, 3, seed=3)
    x_test, y_test = sample_gaussian_moe(truth, 20000, seed=99)
    model = GaussianMoE(2, 3)
    truth_loss = -model.double().log_prob(x_test, y_test, truth).mean().item()
    md = MirrorDescentEM(model, step_size=PowerDecay(1.0, 0.8), batch_size=500)
    stream = gaussian_moe_stream(truth, 500, 40, seed=5)
    history = md.fit(stream, progress=False)
    assert len(history) == 40 and md.samples_seen == 20000
    assert md.evaluate_loss(x_test, y_test) - truth_loss < 2e-3
    # array input with the constructor's batch size
    x, y = sample_gaussian_moe(truth, 2000, seed=6)
    assert len(md.fit(x, y, epochs=2, progress=False)) == 8


def _multinomial_losses(expert_bound, num_steps=15):
    truth = multinomial_moe_truth(2, 2, 3, seed=0)
    x, y = sample_multinomial_moe(truth, 1000, seed=1)
    md = MirrorDescentEM(MultinomialMoE(2, 2, 3), step_size=0.5, expert_bound=expert_bound)
    return [md.step(x, y) for _ in range(num_steps)] + [md.evaluate_loss(x, y)]


@pytest.mark.parametrize("expert_bound", [None, "paper", "jebara-choromanska"])
def test_multinomial_experts_take_a_monotone_mm_step_on_the_mirror_objective(expert_bound):
    losses = _multinomial_losses(expert_bound)
    assert torch.tensor(losses).diff().max() <= 1e-10
    assert losses[-1] < losses[0] - 0.01


def test_the_per_sample_expert_bound_goes_further_in_the_same_steps():
    # Jebara-Choromanska is tighter than Böhning where the experts are confident.
    assert _multinomial_losses("jebara-choromanska")[-1] < _multinomial_losses(None)[-1]


def test_bad_input_is_rejected_before_any_state_change():
    x, y = _data(2, 2, 1, num_samples=300, seed=11)
    with pytest.raises(ValueError, match="step_size"):
        MirrorDescentEM(GaussianMoE(2, 2), step_size=0.0)
    with pytest.raises(ValueError, match="step_size"):
        MirrorDescentEM(GaussianMoE(2, 2), step_size=1.5)
    with pytest.raises(TypeError, match="step_size"):
        MirrorDescentEM(GaussianMoE(2, 2), step_size="big")
    with pytest.raises(ValueError, match="batch_size"):
        MirrorDescentEM(GaussianMoE(2, 2), batch_size=0)
    with pytest.raises(TypeError, match="mean_statistics"):
        MirrorDescentEM(_MeanlessGaussianMoE(2, 2))
    md = MirrorDescentEM(GaussianMoE(2, 2), step_size=lambda n: 1.0 if n == 1 else 2.0)
    md.step(x, y)
    before = [t.clone() for t in tree_leaves(md.params)]
    with pytest.raises(ValueError, match="eta = 2.0"):
        md.step(x, y)
    md.schedule = PowerDecay()
    bad_x = x.clone()
    bad_x[0, 1] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        md.step(bad_x, y)
    assert md.num_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tree_leaves(md.params)))


def test_steps_where_an_expert_has_fewer_rows_than_regressors_are_counted_and_reported():
    """An expert fitted from fewer rows' worth of weight than it has regressors can be wild off
    the batch: such steps are counted and warned about once; with fewer rows than regressors
    the warning also says the solve zeroes the unspanned directions. Batches large enough give
    neither, and the counter survives a checkpoint (an older state without it loads as 0)."""
    truth = gaussian_moe_truth(2, 5, seed=0)
    x, y = sample_gaussian_moe(truth, 400, seed=1)

    def fitted(batch_size, step_size):
        fitter = MirrorDescentEM(GaussianMoE(2, 5, expert_degree=2), step_size=step_size)
        assert fitter.model.expert_features.num_features == 11
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitter.fit(x, y, batch_size=batch_size, progress=False)
        messages = [str(w.message) for w in caught if "expert regressors" in str(w.message)]
        return fitter, messages

    # 8 rows: every step short, and fewer rows than regressors.
    tiny, messages = fitted(8, PowerDecay(1.0, 0.6))
    assert tiny.num_steps == 50 and tiny.regularisation["short_expert_share_steps"] == 50
    assert len(messages) == 1 and "batch of 8 rows" in messages[0]
    assert "fewer than its 11 expert regressors" in messages[0] and "zeroes" in messages[0]
    # 16 rows: more rows than regressors, but two experts share them.
    shared, messages = fitted(16, PowerDecay(1.0, 0.6))
    assert shared.regularisation["short_expert_share_steps"] == shared.num_steps == 25
    assert len(messages) == 1 and "batch of 16 rows" in messages[0]
    assert "zeroes" not in messages[0]
    # 200 rows: about 100 per expert.
    enough, messages = fitted(200, 0.5)
    assert enough.regularisation["short_expert_share_steps"] == 0 and not messages

    state = tiny.state_dict()
    resumed = MirrorDescentEM(GaussianMoE(2, 5, expert_degree=2))
    resumed.load_state_dict(state)
    assert resumed.regularisation["short_expert_share_steps"] == 50
    del state["regularisation"]["short_expert_share_steps"]
    older = MirrorDescentEM(GaussianMoE(2, 5, expert_degree=2))
    older.load_state_dict(state)
    assert older.regularisation["short_expert_share_steps"] == 0
