"""MultinomialMoE (classification experts) and its MM surrogate block: the model is a valid Pyro
model, the expert surrogate majorises and touches the NLL, its solve is the argmin, the exact
M-step is stationary, and the unchanged inference classes fit the model."""

import warnings

import numpy as np
import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from sklearn.datasets import load_iris

from pyro_mm import (
    EM,
    ConstantStep,
    FiniteSumMM,
    GaussianMoE,
    GradientEM,
    IncrementalMM,
    MirrorDescentEM,
    MultinomialMoE,
    PowerDecay,
)
from pyro_mm.datasets.synthetic import (
    multinomial_moe_stream,
    multinomial_moe_truth,
    sample_multinomial_moe,
)
from pyro_mm.infer.svi_fit import SVIFit
from pyro_mm.init import kmeans_init
from pyro_mm.metrics import parameter_error
from pyro_mm.models.features import PolynomialFeatures
from pyro_mm.models.gating import gate_log_probs
from pyro_mm.models.multinomial_moe import multinomial_expert_log_prob
from pyro_mm.models.params import MoEParams, MultinomialExpertParams, tree_map
from pyro_mm.models.priors import MoEPriors
from pyro_mm.surrogates import (
    MultinomialExpertSurrogate,
    expert_surrogate_for,
    gate_surrogate_value,
    mixture_statistics,
    softmax_curvature,
    softmax_regression_loss,
)
from pyro_mm.surrogates.softmax_bound import JaakkolaJordanBound, JebaraChoromanskaBound

BOUNDS = ["bohning", "paper"]
#: The experts' bounds: the constant ones and the per-sample Jebara-Choromanska bound.
EXPERT_BOUNDS = BOUNDS + ["jebara-choromanska"]
EPS = 1e-6


def _random_params(num_experts, gate_dim, num_classes, expert_dim, generator, scale=1.0):
    return MoEParams(
        gate=scale
        * torch.randn(num_experts - 1, gate_dim, generator=generator, dtype=torch.float64),
        experts=MultinomialExpertParams(
            weight=scale
            * torch.randn(
                num_experts, num_classes - 1, expert_dim, generator=generator, dtype=torch.float64
            )
        ),
    )


def _setup(seed, num_experts, in_features, num_classes, degree, num_rows=40):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, in_features, generator=generator, dtype=torch.float64)
    y = torch.randint(num_classes, (num_rows,), generator=generator)
    u = PolynomialFeatures(in_features, degree)(x)
    r = PolynomialFeatures(in_features, 1)(x)
    anchor = _random_params(num_experts, u.shape[1], num_classes, r.shape[1], generator, 0.7)
    return generator, u, r, y, anchor


def _per_sample_nll(params, u, r, y):
    log_joint = gate_log_probs(params.gate, u) + multinomial_expert_log_prob(params.experts, r, y)
    return -torch.logsumexp(log_joint, -1)


def _penalty(params, ridge):
    return 0.5 * ridge * params.experts.weight.square().sum()


def _lse_bound(weight, anchor_weight, features, curvature):
    """Per sample, the quadratic bound of ``log(1 + sum exp(W f))`` expanded at ``anchor_weight``,
    for a ``(..., C-1, D)`` weight (leading dimensions: experts); ``curvature`` is a constant
    matrix or a :class:`JebaraChoromanskaBound` (evaluated at each sample's anchor logits)."""
    anchor_logits = torch.nn.functional.pad(
        torch.einsum("...md,nd->n...m", anchor_weight, features), (0, 1)
    )
    probs = torch.softmax(anchor_logits, -1)[..., :-1]
    delta = torch.einsum("...md,nd->n...m", weight - anchor_weight, features)
    if isinstance(curvature, JebaraChoromanskaBound):
        curvature = curvature.sample_curvature(anchor_logits[..., :-1])
        quadratic = (delta.unsqueeze(-2) @ curvature @ delta.unsqueeze(-1)).reshape(
            delta.shape[:-1]
        )
    else:
        quadratic = ((delta @ curvature) * delta).sum(-1)
    return torch.logsumexp(anchor_logits, -1) + (probs * delta).sum(-1) + 0.5 * quadratic


def _direct_surrogate(params, anchor, u, r, y, gate_curvature, expert_curvature):
    """Eq. (19) transcribed per sample: Jensen's bound at the anchor's responsibilities, the
    quadratic bound of the gate's log-partition (``B = C_K (x) u u^T + eps I``) and of every
    expert's log-partition (``C_M (x) r r^T``, weighted by ``tau_k``)."""
    num_classes = params.experts.weight.shape[1] + 1
    log_joint = gate_log_probs(anchor.gate, u) + multinomial_expert_log_prob(anchor.experts, r, y)
    tau = torch.softmax(log_joint, -1)
    entropy_term = (tau * tau.clamp_min(1e-300).log()).sum(-1)
    gate_logits = torch.nn.functional.pad(u @ params.gate.T, (0, 1))
    gate_term = -(tau * gate_logits).sum(-1) + _lse_bound(
        params.gate, anchor.gate, u, gate_curvature
    )
    gate_term = gate_term + 0.5 * EPS * (params.gate - anchor.gate).square().sum()
    targets = torch.nn.functional.one_hot(y, num_classes)[:, :-1].to(r.dtype)
    label_logit = torch.einsum("kmd,nd,nm->nk", params.experts.weight, r, targets)
    lse = _lse_bound(params.experts.weight, anchor.experts.weight, r, expert_curvature)
    expert_term = (tau * (lse - label_logit)).sum(-1)
    return entropy_term + gate_term + expert_term


# ------------------------------------------------------------------------------------ the model
def test_log_prob_predict_and_sample_agree_with_a_direct_computation():
    model = MultinomialMoE(3, 2, 4, gate_degree=2).double()
    generator = torch.Generator().manual_seed(0)
    params = _random_params(3, 5, 4, 3, generator, scale=1.5)
    model.set_params(params)
    x = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    u, r = model.features(x)
    gate = torch.softmax(torch.nn.functional.pad(u @ params.gate.T, (0, 1)), -1)
    logits = torch.nn.functional.pad(torch.einsum("kmd,nd->nkm", params.experts.weight, r), (0, 1))
    expected = (gate.unsqueeze(-1) * torch.softmax(logits, -1)).sum(1)  # (N, M)
    probs = model.predict(x)
    assert torch.allclose(probs, expected, atol=1e-14)
    for label in range(4):
        y = torch.full((6,), label)
        assert torch.allclose(model.log_prob(x, y).exp(), expected[:, label], atol=1e-14)

    # Sampling: reproducible with a generator, and the empirical class frequencies match predict.
    x_one = x[:1].expand(40_000, 2)
    y1, z1 = model.sample(x_one, generator=torch.Generator().manual_seed(3))
    y2, z2 = model.sample(x_one, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2) and torch.equal(z1, z2) and y1.dtype == torch.int64
    frequencies = torch.bincount(y1, minlength=4).double() / len(y1)
    assert torch.allclose(frequencies, expected[0], atol=0.015)
    assert torch.allclose(torch.bincount(z1, minlength=3).double() / len(z1), gate[0], atol=0.015)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predict_gives_probabilities_at_most_one_when_the_experts_agree(dtype):
    """Experts all nearly certain of one class, mixed by the gate: ``log sum_k g_k e_k`` is
    zero up to round-off, which rounded above zero in many rows before the clamp (float32: 334
    of these 20,000 rows above one, by up to 2.4e-7; float64: 219, by up to 4.4e-16, the
    ``1.0000000000000002`` that sklearn's ``log_loss`` rejects)."""
    from sklearn.metrics import log_loss

    model = MultinomialMoE(3, 4, 3).to(dtype)
    generator = torch.Generator().manual_seed(0)
    params = model.get_params()
    params.experts.weight.zero_()[:, 0, 0] = 50.0  # every expert: class 0, certain
    params.gate.copy_(torch.randn(params.gate.shape, generator=generator))
    model.set_params(params)
    x = torch.randn(20_000, 4, generator=generator).to(dtype)
    probs = model.predict(x)
    assert probs.dtype == dtype
    assert probs.min() >= 0 and probs.max() <= 1
    assert (probs.sum(-1) - 1).abs().max() <= 4 * torch.finfo(dtype).eps
    assert log_loss(np.zeros(len(x)), probs.numpy(), labels=[0, 1, 2]) < 1e-6


def test_check_y_rejects_bad_labels_before_any_state_changes():
    model = MultinomialMoE(2, 2, 3).double()
    x = torch.zeros(4, 2, dtype=torch.float64)
    assert model.check_y(np.array([0, 1, 2, 1]), 4).dtype == torch.int64
    assert torch.equal(
        model.check_y(torch.tensor([0.0, 2.0, 1.0, 0.0]), 4), torch.tensor([0, 2, 1, 0])
    )
    with pytest.raises(ValueError, match="non-integer values \\[0.5\\] at row\\(s\\) \\[1\\]"):
        model.check_y(torch.tensor([0.0, 0.5, 1.0, 0.0]), 4)
    with pytest.raises(
        ValueError, match="must lie in \\{0, ..., 2\\}.*\\[3, -1\\] at row\\(s\\) \\[1, 3\\]"
    ):
        model.check_y(torch.tensor([0, 3, 1, -1]), 4)
    with pytest.raises(ValueError, match="x has 4 rows but y has 3"):
        model.check_y(torch.tensor([0, 1, 1]), 4)
    with pytest.raises(ValueError, match="1-D tensor of N class labels"):
        model.check_y(torch.zeros(4, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="NaN"):
        model.check_y(torch.tensor([0.0, float("nan"), 1.0, 0.0]), 4)
    with pytest.raises(TypeError, match="numeric"):
        model.check_y(np.array(["a", "b", "c", "d"]), 4)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        MultinomialMoE(2, 2, 1)
    infer = IncrementalMM(model)
    with pytest.raises(ValueError, match="must lie in"):
        infer.step(x, torch.tensor([0, 1, 5, 0]))
    assert infer.params is None and infer.num_steps == 0 and not model.fitted


def test_parameters_are_pyro_params_and_round_trip():
    model = MultinomialMoE(2, 3, 4, seed=1).double()
    names = {name for name, _ in model.named_pyro_params()}
    assert names == {"gate_weight", "expert_weight"}
    generator = torch.Generator().manual_seed(2)
    params = _random_params(2, 4, 4, 4, generator)
    model.set_params(params)
    assert torch.equal(model.get_params().experts.weight, params.experts.weight)
    assert torch.equal(model.expert_weight.detach(), params.experts.weight)


def test_forward_is_a_pyro_model_with_the_mixture_likelihood():
    model = MultinomialMoE(3, 2, 3).double()
    generator = torch.Generator().manual_seed(0)
    model.set_params(_random_params(3, 3, 3, 3, generator))
    x = torch.randn(20, 2, generator=generator, dtype=torch.float64)
    y = torch.randint(3, (20,), generator=generator)
    trace = pyro.poutine.trace(model).get_trace(x, y)
    trace.compute_log_prob()
    site = trace.nodes["y"]
    assert site["is_observed"]
    assert torch.allclose(site["log_prob_sum"], model.log_prob(x, y).sum(), atol=1e-12)
    scaled = pyro.poutine.trace(model).get_trace(x, y, num_data=200)
    assert torch.allclose(scaled.log_prob_sum(), 10 * model.log_prob(x, y).sum(), atol=1e-10)

    pyro.set_rng_seed(0)
    for parallel in (False, True):
        draws = Predictive(model, num_samples=400, parallel=parallel)(x[:10])["y"]
        assert draws.shape == (400, 10) and draws.min() >= 0 and draws.max() <= 2
        # Predictive's draws follow predict's class probabilities (sd <= 0.025 per entry).
        frequencies = torch.nn.functional.one_hot(draws, 3).double().mean(0)
        assert (frequencies - model.predict(x[:10])).abs().max() < 0.1


def test_svi_with_an_empty_guide_decreases_the_nll():
    truth = multinomial_moe_truth(2, 2, 3, seed=0)
    x, y = sample_multinomial_moe(truth, 500, seed=1)
    model = MultinomialMoE(2, 2, 3).double()
    start = -model.log_prob(x, y).mean().item()
    svi = SVI(
        model, lambda x, y=None, num_data=None: None, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()
    )
    for _ in range(100):
        svi.step(x, y)
    end = -model.log_prob(x, y).mean().item()
    assert end < start - 0.1
    assert abs(svi.evaluate_loss(x, y) / len(y) - end) < 1e-10


# ---------------------------------------------------------------------------- the surrogate
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_experts=st.integers(2, 4),
    in_features=st.integers(1, 3),
    num_classes=st.integers(2, 5),
    degree=st.integers(1, 2),
    bound=st.sampled_from(BOUNDS),
    expert_bound=st.sampled_from(EXPERT_BOUNDS),
)
def test_surrogate_majorises_and_touches(
    seed, num_experts, in_features, num_classes, degree, bound, expert_bound
):
    generator, u, r, y, anchor = _setup(seed, num_experts, in_features, num_classes, degree)
    gate_curvature = softmax_curvature(num_experts - 1, bound)
    expert_curvature = MultinomialExpertSurrogate(bound=expert_bound).curvature(
        num_classes, torch.float64
    )
    direct = _direct_surrogate(anchor, anchor, u, r, y, gate_curvature, expert_curvature)
    assert torch.allclose(direct, _per_sample_nll(anchor, u, r, y), atol=1e-10, rtol=0)
    for scale in (0.3, 1.0, 3.0):
        point = _random_params(num_experts, u.shape[1], num_classes, r.shape[1], generator, scale)
        surrogate = _direct_surrogate(point, anchor, u, r, y, gate_curvature, expert_curvature)
        assert (surrogate - _per_sample_nll(point, u, r, y)).min() >= -1e-10


@pytest.mark.parametrize("bound", EXPERT_BOUNDS)
def test_expert_block_majorises_touches_and_is_tangent(bound):
    """With tau fixed, the block's value from statistics bounds the weighted expert NLL plus
    ridge (differences from the expansion point), with equal gradients at that point."""
    generator, u, r, y, anchor = _setup(4, 3, 2, 4, 1, num_rows=60)
    tau = torch.softmax(torch.randn(60, 3, generator=generator, dtype=torch.float64), -1)
    block = MultinomialExpertSurrogate(ridge=1e-2, bound=bound)
    stats = block.statistics(anchor.experts, r, y, tau)

    def objective(weight):
        log_prob = multinomial_expert_log_prob(MultinomialExpertParams(weight), r, y)
        return -(tau * log_prob).sum(-1).mean() + 0.5 * block.ridge * weight.square().sum()

    def value(weight):
        return block.value(MultinomialExpertParams(weight), stats)

    base = anchor.experts.weight
    for scale in (0.1, 1.0, 4.0):
        for _ in range(5):
            point = base + scale * torch.randn(base.shape, generator=generator, dtype=torch.float64)
            excess = (value(point) - value(base)) - (objective(point) - objective(base))
            assert excess >= -1e-12
    leaf = base.clone().requires_grad_()
    (surrogate_grad,) = torch.autograd.grad(value(leaf), leaf)
    (objective_grad,) = torch.autograd.grad(objective(leaf), leaf)
    assert torch.allclose(surrogate_grad, objective_grad, atol=1e-13)


def _lse(logits):
    return torch.logsumexp(torch.nn.functional.pad(logits, (0, 1)), -1)


@settings(deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_classes=st.integers(2, 8),
    scale=st.sampled_from([0.0, 0.5, 3.0, 20.0]),
)
def test_jebara_choromanska_bound_majorises_and_touches_the_log_partition(seed, num_classes, scale):
    """``lse(eta) <= lse(xi) + p(xi)^T (eta - xi) + 1/2 (eta - xi)^T Sigma(xi) (eta - xi)`` for
    every ``eta``, with equal value and gradient at ``xi`` (confident and flat softmaxes)."""
    generator = torch.Generator().manual_seed(seed)
    anchor = scale * torch.randn(num_classes - 1, generator=generator, dtype=torch.float64)
    curvature = JebaraChoromanskaBound().sample_curvature(anchor)
    assert torch.allclose(curvature, curvature.T, atol=1e-15)
    assert torch.linalg.eigvalsh(curvature).min() >= -1e-15
    probs = torch.softmax(torch.nn.functional.pad(anchor, (0, 1)), -1)[:-1]

    def bound(eta):
        delta = eta - anchor
        return _lse(anchor) + delta @ probs + 0.5 * delta @ curvature @ delta

    for step in (1e-3, 0.1, 1.0, 5.0, 30.0):
        points = anchor + step * torch.randn(
            50, num_classes - 1, generator=generator, dtype=torch.float64
        )
        gaps = torch.stack([bound(p) for p in points]) - _lse(points)
        assert gaps.min() >= -1e-12
    leaf = anchor.clone().requires_grad_()
    (bound_grad,) = torch.autograd.grad(bound(leaf), leaf)
    (lse_grad,) = torch.autograd.grad(_lse(leaf), leaf)
    assert bound(anchor) == _lse(anchor)
    assert torch.allclose(bound_grad, lse_grad, atol=1e-14)


def test_jebara_choromanska_bound_is_jaakkola_jordan_for_two_classes_and_batched():
    logits = torch.linspace(-30, 30, 61, dtype=torch.float64).unsqueeze(-1)
    curvature = JebaraChoromanskaBound().sample_curvature(logits)
    assert curvature.shape == (61, 1, 1)
    expected = JaakkolaJordanBound.sample_curvature(logits.squeeze(-1))
    assert torch.allclose(curvature.reshape(-1), expected, rtol=1e-13, atol=0)
    # Batched over leading dimensions, equal to the one-sample evaluation.
    generator = torch.Generator().manual_seed(0)
    many = 3 * torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)
    batched = JebaraChoromanskaBound().sample_curvature(many)
    assert batched.shape == (4, 5, 3, 3)
    assert torch.allclose(batched[2, 3], JebaraChoromanskaBound().sample_curvature(many[2, 3]))


def test_jebara_choromanska_bound_shrinks_with_confidence_unlike_bohning():
    """Why it is the default: at a confident softmax (margin ``s``) its curvature decays like
    ``1 / s`` (measured: trace ``2.2 / s`` times Böhning's, largest eigenvalue below ``1.9 / s``
    for four classes), against Böhning's constant (largest eigenvalue ``1/2``)."""
    bohning = softmax_curvature(3, "bohning")
    for margin in (4.0, 8.0, 16.0, 32.0):
        logits = torch.tensor([margin, 0.0, 0.0], dtype=torch.float64)
        curvature = JebaraChoromanskaBound().sample_curvature(logits)
        assert torch.trace(curvature) < torch.trace(bohning) * 2.5 / margin
        assert torch.linalg.eigvalsh(curvature).max() < 2 / margin
    flat = JebaraChoromanskaBound().sample_curvature(torch.zeros(3, dtype=torch.float64))
    assert torch.linalg.eigvalsh(flat).max() <= 0.5 + 1e-12


def _assert_majorises_and_touches(value, objective, base, generator, scales, draws):
    """``value - objective`` is smallest at ``base`` (the surrogate majorises the objective up to
    a constant, checked at ``draws`` random points per scale) and their gradients agree there."""
    for scale in scales:
        for _ in range(draws):
            point = base + scale * torch.randn(base.shape, generator=generator, dtype=torch.float64)
            assert (value(point) - value(base)) - (objective(point) - objective(base)) >= -1e-12
    leaf = base.clone().requires_grad_()
    (value_grad,) = torch.autograd.grad(value(leaf), leaf)
    (objective_grad,) = torch.autograd.grad(objective(leaf), leaf)
    assert torch.allclose(value_grad, objective_grad, atol=1e-13)


@settings(deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_experts=st.integers(1, 3),
    num_classes=st.integers(2, 6),
    in_features=st.integers(1, 3),
    scale=st.sampled_from([0.3, 1.0, 4.0]),
)
def test_jebara_choromanska_expert_block_majorises_touches_and_solves_exactly(
    seed, num_experts, num_classes, in_features, scale
):
    """The dense expert block: value from statistics majorises the weighted expert NLL plus the
    ridge (differences from the expansion point), touches it with equal gradients, and its solve
    is the argmin (gradient of the surrogate there below 1e-8, float64)."""
    generator = torch.Generator().manual_seed(seed)
    rows = 30
    r = PolynomialFeatures(in_features, 1)(
        torch.randn(rows, in_features, generator=generator, dtype=torch.float64)
    )
    y = torch.randint(num_classes, (rows,), generator=generator)
    tau = torch.softmax(
        torch.randn(rows, num_experts, generator=generator, dtype=torch.float64), -1
    )
    base = scale * torch.randn(
        num_experts, num_classes - 1, r.shape[1], generator=generator, dtype=torch.float64
    )
    block = MultinomialExpertSurrogate(ridge=1e-3, bound="jebara-choromanska")
    stats = block.statistics(MultinomialExpertParams(base), r, y, tau)

    def objective(weight):
        log_prob = multinomial_expert_log_prob(MultinomialExpertParams(weight), r, y)
        return -(tau * log_prob).sum(-1).mean() + 0.5 * block.ridge * weight.square().sum()

    def value(weight):
        return block.value(MultinomialExpertParams(weight), stats)

    _assert_majorises_and_touches(value, objective, base, generator, (0.1, 1.0, 5.0), draws=4)
    solved, _ = block.solve(stats, MultinomialExpertParams(base))
    leaf = solved.weight.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(value(leaf), leaf)
    assert gradient.abs().max() < 1e-8
    assert objective(solved.weight) <= objective(base) + 1e-12


def test_jebara_choromanska_step_is_longer_than_bohning_on_confident_experts():
    """From the same confident experts, one solve of the per-sample bound decreases the weighted
    NLL more than one solve of Böhning's (the reason for the default)."""
    generator, u, r, y, anchor = _setup(2, 2, 2, 4, 1, num_rows=200)
    anchor = MoEParams(anchor.gate, MultinomialExpertParams(4 * anchor.experts.weight))
    logits = torch.einsum("kmd,nd->nkm", anchor.experts.weight, r)
    y = torch.nn.functional.pad(logits, (0, 1)).argmax(-1)[:, 0]
    tau = torch.softmax(torch.randn(200, 2, generator=generator, dtype=torch.float64), -1)
    targets = torch.nn.functional.one_hot(y, 4).double()

    def objective(weight):
        return sum(
            softmax_regression_loss(weight[k], r, targets, tau[:, k], 1e-3) for k in range(2)
        )

    decrease = {}
    for bound in ("bohning", "jebara-choromanska"):
        block = MultinomialExpertSurrogate(ridge=1e-3, bound=bound)
        solved, _ = block.solve(block.statistics(anchor.experts, r, y, tau), anchor.experts)
        decrease[bound] = objective(anchor.experts.weight) - objective(solved.weight)
    assert decrease["jebara-choromanska"] > 1.5 * decrease["bohning"] > 0


@pytest.mark.parametrize("bound", EXPERT_BOUNDS)
def test_statistics_represent_the_surrogate_up_to_a_constant(bound):
    generator, u, r, y, anchor = _setup(3, 3, 2, 4, 2)
    gate_curvature = softmax_curvature(2, bound if bound in BOUNDS else "bohning")
    block = MultinomialExpertSurrogate(ridge=1e-3, bound=bound)
    expert_curvature = block.curvature(4, torch.float64)
    stats, _ = mixture_statistics(block, anchor, u, r, y, gate_curvature, EPS)
    differences = []
    for _ in range(6):
        point = _random_params(3, u.shape[1], 4, r.shape[1], generator, scale=2.0)
        from_stats = gate_surrogate_value(point.gate, stats.gate, gate_curvature, EPS)
        from_stats = from_stats + block.value(point.experts, stats.experts)
        direct = _direct_surrogate(point, anchor, u, r, y, gate_curvature, expert_curvature)
        direct = direct.mean() + _penalty(point, block.ridge)
        differences.append((from_stats - direct).item())
    assert max(differences) - min(differences) < 1e-10


def test_statistics_are_averages_over_rows():
    """Statistics of a concatenated batch are the size-weighted average of the parts' (what lets
    running averages and all-reduce combine them)."""
    generator, u, r, y, anchor = _setup(5, 2, 2, 3, 1, num_rows=50)
    tau = torch.softmax(torch.randn(50, 2, generator=generator, dtype=torch.float64), -1)
    block = MultinomialExpertSurrogate()
    whole = block.statistics(anchor.experts, r, y, tau)
    first = block.statistics(anchor.experts, r[:20], y[:20], tau[:20])
    second = block.statistics(anchor.experts, r[20:], y[20:], tau[20:])
    combined = tree_map(lambda a, b: (20 * a + 30 * b) / 50, first, second)
    for name in ("weight", "gram", "linear"):
        assert torch.allclose(getattr(combined, name), getattr(whole, name), atol=1e-14)


@pytest.mark.parametrize("bound", EXPERT_BOUNDS)
@pytest.mark.parametrize("ridge", [1e-8, 1e-2])
def test_solve_is_the_argmin(bound, ridge):
    generator, u, r, y, anchor = _setup(7, 4, 3, 5, 2)
    block = MultinomialExpertSurrogate(ridge=ridge, bound=bound)
    gate_curvature = softmax_curvature(3, bound if bound in BOUNDS else "bohning")
    stats, _ = mixture_statistics(block, anchor, u, r, y, gate_curvature, EPS)
    experts, report = block.solve(stats.experts, anchor.experts)
    assert not report.empty_experts.any()
    leaf = experts.weight.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(
        block.value(MultinomialExpertParams(leaf), stats.experts), leaf
    )
    assert gradient.abs().max() < 1e-8
    # A minimiser: the value there is below the value at the expansion point and nearby points.
    assert block.value(experts, stats.experts) < block.value(anchor.experts, stats.experts)


def test_exact_m_step_is_stationary_for_the_weighted_penalised_nll():
    generator, u, r, y, anchor = _setup(11, 3, 2, 4, 1, num_rows=200)
    tau = torch.softmax(torch.randn(200, 3, generator=generator, dtype=torch.float64), -1)
    block = MultinomialExpertSurrogate(ridge=1e-3)
    experts, report = block.exact_m_step(anchor.experts, r, y, tau)
    assert not report.empty_experts.any()
    targets = torch.nn.functional.one_hot(y, 4).double()
    leaf = experts.weight.clone().requires_grad_()
    loss = sum(
        softmax_regression_loss(leaf[k], r, targets, tau[:, k], block.ridge) for k in range(3)
    )
    (gradient,) = torch.autograd.grad(loss, leaf)
    assert gradient.abs().max() < 1e-10
    # One MM solve from the same point decreases the same objective but does not reach it.
    stats = block.statistics(anchor.experts, r, y, tau)
    mm_experts, _ = block.solve(stats, anchor.experts)

    def objective(weight):
        return sum(
            softmax_regression_loss(weight[k], r, targets, tau[:, k], block.ridge) for k in range(3)
        )

    assert (
        objective(experts.weight) < objective(mm_experts.weight) < objective(anchor.experts.weight)
    )


def test_empty_experts_keep_their_previous_parameters():
    generator, u, r, y, anchor = _setup(1, 3, 2, 3, 1)
    resp = torch.zeros(len(y), 3, dtype=torch.float64)
    resp[:, 0] = 1.0
    block = MultinomialExpertSurrogate()
    experts, report = block.solve(block.statistics(anchor.experts, r, y, resp), anchor.experts)
    assert report.empty_experts.tolist() == [False, True, True]
    assert torch.equal(experts.weight[1:], anchor.experts.weight[1:])
    assert torch.isfinite(experts.weight).all()
    experts, report = block.exact_m_step(anchor.experts, r, y, resp)
    assert report.empty_experts.tolist() == [False, True, True]
    assert torch.equal(experts.weight[1:], anchor.experts.weight[1:])


def test_surrogate_options_are_validated_and_registered():
    model = MultinomialMoE(2, 2, 3)
    block = expert_surrogate_for(model, ridge=1e-4, variance_floor=1e-6)
    assert isinstance(block, MultinomialExpertSurrogate) and block.ridge == 1e-4
    with pytest.raises(ValueError, match="ridge > 0"):
        MultinomialExpertSurrogate(ridge=0.0)
    with pytest.raises(ValueError, match="unknown softmax bound 'jaakkola'.*jebara-choromanska"):
        MultinomialExpertSurrogate(bound="jaakkola")
    assert block.bound == "bohning"
    assert torch.equal(block.curvature(3, torch.float64), softmax_curvature(2, "bohning"))
    tight = MultinomialExpertSurrogate(bound="jebara-choromanska")
    assert isinstance(tight.curvature(3, torch.float64), JebaraChoromanskaBound)
    with pytest.raises(ValueError, match="no coefficient penalty or variance prior"):
        expert_surrogate_for(model, ridge=1e-4, penalty=object())


@pytest.mark.parametrize("fitter", [IncrementalMM, FiniteSumMM, MirrorDescentEM])
def test_expert_bound_option_reaches_softmax_experts_and_is_refused_elsewhere(fitter):
    infer = fitter(MultinomialMoE(2, 3, 4), expert_bound="jebara-choromanska")
    assert infer.expert_surrogate.bound == "jebara-choromanska"
    assert fitter(MultinomialMoE(2, 3, 4)).expert_surrogate.bound == "bohning"
    assert infer.state_dict()["options"]["expert_bound"] == "jebara-choromanska"
    with pytest.raises(ValueError, match="does not match"):
        fitter(MultinomialMoE(2, 3, 4)).load_state_dict(infer.state_dict())
    with pytest.raises(ValueError, match="expert_bound applies to experts with a softmax"):
        fitter(GaussianMoE(2, 3), expert_bound="bohning")
    with pytest.raises(ValueError, match="unknown softmax bound"):
        fitter(MultinomialMoE(2, 3, 4), expert_bound="tight")


# ---------------------------------------------------------------------- unchanged inference
def _penalised_nll(model, x, y, ridge):
    params = model.get_params()
    return -model.log_prob(x, y).mean().item() + _penalty(params, ridge).item()


def test_batch_mm_decreases_the_penalised_nll_monotonically():
    """IncrementalMM with gamma = 1 on the whole data set is batch MM: every step minimises a
    majoriser, so the penalised NLL never increases."""
    truth = multinomial_moe_truth(3, 2, 4, seed=3)
    x, y = sample_multinomial_moe(truth, 500, seed=4)
    model = MultinomialMoE(3, 2, 4, expert_degree=2).double()
    infer = IncrementalMM(model, schedule=ConstantStep(1.0), ridge=1e-3, init="current")
    values = [_penalised_nll(model, x, y, 1e-3)]
    for _ in range(40):
        infer.step(x, y)
        values.append(_penalised_nll(model, x, y, 1e-3))
    increases = np.diff(values)
    assert increases.max() <= 1e-12
    assert values[-1] < values[0] - 0.1


def _perturbed_truth_fit(truth, num_batches, noise=1.0, schedule=None):
    """IncrementalMM from the truth plus ``noise`` N(0, 1) (the paper's initialisation) on a
    stream of ``num_batches`` batches of 250; returns (initial error, final error, NLL excess)."""
    model = MultinomialMoE(2, 2, 3).double()
    generator = torch.Generator().manual_seed(5)
    start = tree_map(
        lambda t: t + noise * torch.randn(t.shape, generator=generator, dtype=t.dtype), truth
    )
    model.set_params(start)
    infer = IncrementalMM(model, init="current", schedule=schedule)
    history = infer.fit(multinomial_moe_stream(truth, 250, num_batches, seed=1), progress=False)
    assert history.samples_seen[-1] == 250 * num_batches
    x_test, y_test = sample_multinomial_moe(truth, 20_000, seed=99)
    excess = (model.log_prob(x_test, y_test, truth) - model.log_prob(x_test, y_test)).mean()
    return (
        parameter_error(start, truth)["total"],
        parameter_error(model.get_params(), truth)["total"],
        excess.item(),
    )


def test_incremental_mm_recovers_seeded_parameters():
    """One pass over 60 000 samples: the held-out NLL comes within 0.006 nats of the truth's
    and the parameter error drops from 0.43 to below 0.3 (measured: 0.0039 and 0.25). The
    parameters converge much more slowly than the NLL: the likelihood is flat along directions
    that trade gate against experts, and batch MM itself needs ~300 iterations there."""
    truth = multinomial_moe_truth(2, 2, 3, seed=0)
    initial_error, error, excess = _perturbed_truth_fit(truth, 240)
    assert initial_error > 0.4
    assert error < 0.3
    assert excess < 0.006


@pytest.mark.slow
def test_incremental_mm_recovers_seeded_parameters_closely_on_a_long_stream():
    """1.5 million samples with ``gamma_n = n^-0.51``: error below 0.1 (measured 0.077). The
    iterate travels about ``sum_n gamma_n ~ n^0.49 / 0.49`` batch-MM steps (145 here; the
    default exponent 0.6 gives ``n^0.4 / 0.4``, 69 after 4000 batches, error 0.15), and batch MM
    needs ~300 steps to settle the parameters."""
    truth = multinomial_moe_truth(2, 2, 3, seed=0)
    _, error, excess = _perturbed_truth_fit(truth, 6000, schedule=PowerDecay(1.0, 0.51))
    assert error < 0.1
    assert excess < 0.001


def _classification_data(num_samples=600, seed=3):
    truth = multinomial_moe_truth(3, 2, 4, seed=seed)
    return sample_multinomial_moe(truth, num_samples, seed=seed + 1)


def test_em_decreases_the_penalised_nll_monotonically():
    x, y = _classification_data()
    ridge = 1e-3
    model = MultinomialMoE(3, 2, 4).double()
    em = EM(model, ridge=ridge, init="current")
    values = [_penalised_nll(model, x, y, ridge)]
    for _ in range(15):
        em.step(x, y)
        values.append(_penalised_nll(model, x, y, ridge))
    assert np.diff(values).max() <= 1e-10
    assert values[-1] < values[0] - 0.1
    # EM's exact M-steps make far more progress per iteration than one MM step each.
    mm_model = MultinomialMoE(3, 2, 4).double()
    mm = IncrementalMM(mm_model, schedule=ConstantStep(1.0), ridge=ridge, init="current")
    for _ in range(15):
        mm.step(x, y)
    assert values[-1] < _penalised_nll(mm_model, x, y, ridge)


@pytest.mark.parametrize("step_size", [1.0, 0.5])
def test_mirror_descent_em_decreases_the_penalised_nll_monotonically(step_size):
    """Its expert update is one quadratic-bound step on the mirror-descent objective (the mixed
    mean/observed statistics), still a descent step."""
    x, y = _classification_data()
    ridge = 1e-3
    model = MultinomialMoE(3, 2, 4).double()
    md = MirrorDescentEM(model, step_size=step_size, ridge=ridge, init="current")
    values = [_penalised_nll(model, x, y, ridge)]
    for _ in range(15):
        md.step(x, y)
        values.append(_penalised_nll(model, x, y, ridge))
    assert np.diff(values).max() <= 1e-10
    assert values[-1] < values[0] - 0.05


def test_mean_statistics_mixed_with_the_observed_ones_bound_the_mirror_descent_objective():
    """``(1 - eta) mean + eta observed`` statistics represent (up to a constant) the quadratic
    bound of the weighted soft-label softmax regression with weights ``(1 - eta) g + eta tau``
    and targets ``[(1 - eta) g p + eta tau t] / weight``: it touches and majorises it."""
    generator, u, r, y, anchor = _setup(8, 3, 2, 4, 1, num_rows=80)
    tau = torch.softmax(torch.randn(80, 3, generator=generator, dtype=torch.float64), -1)
    gate = torch.softmax(torch.randn(80, 3, generator=generator, dtype=torch.float64), -1)
    eta = 0.3
    block = MultinomialExpertSurrogate(ridge=1e-3)
    mixed = tree_map(
        lambda mean, observed: (1 - eta) * mean + eta * observed,
        block.mean_statistics(anchor.experts, r, gate),
        block.statistics(anchor.experts, r, y, tau),
    )
    probs = torch.softmax(
        torch.nn.functional.pad(torch.einsum("kmd,nd->nkm", anchor.experts.weight, r), (0, 1)), -1
    )
    onehot = torch.nn.functional.one_hot(y, 4).double()
    row_weight = (1 - eta) * gate + eta * tau

    def objective(weight):
        total = 0.5 * block.ridge * weight.square().sum()
        for k in range(3):
            targets = (1 - eta) * gate[:, k, None] * probs[:, k] + eta * tau[:, k, None] * onehot
            targets = targets / row_weight[:, k, None]
            total = total + softmax_regression_loss(weight[k], r, targets, row_weight[:, k])
        return total

    def value(weight):
        return block.value(MultinomialExpertParams(weight), mixed)

    base = anchor.experts.weight
    _assert_majorises_and_touches(value, objective, base, generator, (0.1, 1.0, 3.0), draws=1)


_FITTERS = {
    "IncrementalMM": lambda model: IncrementalMM(model, ridge=1e-4, init="current"),
    "MirrorDescentEM": lambda model: MirrorDescentEM(
        model, PowerDecay(1.0, 0.6), ridge=1e-4, init="current"
    ),
    "GradientEM": lambda model: GradientEM(
        model, lr_gate=0.5, lr_experts=0.5, ridge=1e-4, init="current"
    ),
    "SVIFit": lambda model: SVIFit(
        model, optim=torch.optim.Adam, optim_args={"lr": 0.05}, init="current"
    ),
    "SVIFit-MAP": lambda model: SVIFit(
        model, AutoDelta, optim=torch.optim.Adam, optim_args={"lr": 0.05}, init="current"
    ),
}


@pytest.mark.parametrize("method", sorted(_FITTERS) + ["EM"])
def test_every_inference_class_fits_the_model_unchanged(method):
    """Each inference class, unchanged, fits MultinomialMoE from one K-means start (the one-hot
    labels are K-means' view of y) and improves the held-out NLL on the start's."""
    truth = multinomial_moe_truth(3, 2, 4, seed=3)
    x, y = sample_multinomial_moe(truth, 2000, seed=4)
    x_test, y_test = sample_multinomial_moe(truth, 2000, seed=5)
    priors = MoEPriors() if method == "SVIFit-MAP" else None
    model = MultinomialMoE(3, 2, 4, priors=priors).double()
    model.set_params(kmeans_init(model, x[:500], y[:500], seed=0))
    initial = -model.log_prob(x_test, y_test).mean().item()
    if method == "EM":
        em = EM(model, ridge=1e-4, init="current")
        em.fit(x, y, max_iter=50, tol=1e-3, progress=False)
        assert em.converged
    else:
        _FITTERS[method](model).fit(x, y, batch_size=100, epochs=2, progress=False)
    final = -model.log_prob(x_test, y_test).mean().item()
    assert np.isfinite(final) and final < initial - 0.02
    assert model.predict(x_test).shape == (2000, 4)


def test_kmeans_start_is_the_same_fit_on_raw_or_standardised_inputs_and_any_initial_weights():
    """The K-means start fits the multinomial experts by one MM step from zero coefficients: a
    least-squares fit of the labels, the same function of x whether the inputs are raw (wine:
    scales up to 10^3) or standardised, and whatever the model's random initial weights. From
    the random weights, on the raw inputs in a shuffled order, the start was at a mean NLL of
    20.4 nats and IncrementalMM (20 passes) ended at 6.06, against 0.062 standardised."""
    from sklearn.datasets import load_wine

    features, labels = load_wine(return_X_y=True)
    raw = torch.as_tensor(features)
    y = torch.as_tensor(labels)
    standardised = (raw - raw.mean(0)) / raw.std(0)
    probabilities = {}
    for name, x in (("raw", raw), ("standardised", standardised)):
        for seed in (0, 1):
            model = MultinomialMoE(2, x.shape[1], 3, seed=seed).double()
            model.set_params(kmeans_init(model, x, y, seed=0))
            probabilities[name, seed] = model.predict(x)
    reference = probabilities["standardised", 0]
    for key, value in probabilities.items():
        # Equal up to the ridge (1e-8, not scale-invariant): 1.3e-5 apart at most.
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-4, msg=str(key))
    start_nll = -torch.log(reference[torch.arange(len(y)), y]).mean().item()
    assert start_nll < 1.0

    nll = {}
    for name, x in (("raw", raw), ("standardised", standardised)):
        model = MultinomialMoE(2, x.shape[1], 3).double()
        IncrementalMM(model).fit(x, y, batch_size=32, epochs=5, shuffle=True, progress=False)
        nll[name] = -model.log_prob(x, y).mean().item()
    assert nll["raw"] < 0.3 and nll["standardised"] < 0.3, nll


def test_em_reports_a_fit_that_separates_the_training_classes():
    """Separable labels: the likelihood has no finite maximiser and EM stops where the NLL's
    changes fall below tol; that is warned. Overlapping classes (iris) are not."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=generator, dtype=torch.float64)
    labels = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    with pytest.warns(RuntimeWarning, match="the fit separates the training classes"):
        EM(MultinomialMoE(1, 2, 2).double()).fit(x, labels, progress=False)
    # The streaming fitters check at the end of a fit on arrays too. Their first-order or
    # quadratic-bound steps approach separation slowly (IncrementalMM: mean NLL 0.09 after 1000
    # passes here), so start from separating weights (the last class is the reference).
    model = MultinomialMoE(1, 2, 2).double()
    separating = torch.tensor([[[0.0, -100.0, -50.0]]], dtype=torch.float64)
    model.set_params(
        MoEParams(gate=model.get_params().gate, experts=MultinomialExpertParams(separating))
    )
    with pytest.warns(RuntimeWarning, match="the fit separates the training classes") as caught:
        IncrementalMM(model, init="current").fit(x, labels, batch_size=50, progress=False)
    reports = [w for w in caught if "separates" in str(w.message)]
    assert reports[0].filename == __file__  # points at the caller of fit
    iris_x, iris_y = load_iris(return_X_y=True)
    iris_x = (iris_x - iris_x.mean(0)) / iris_x.std(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitter = EM(MultinomialMoE(1, 4, 3).double())
        fitter.fit(iris_x, iris_y, progress=False)
    assert fitter.converged and fitter.history.loss[-1] > 0.01
    assert not [w for w in caught if "separates" in str(w.message)]
