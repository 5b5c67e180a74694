"""The spectral method of Makkuva et al.: transforms, scores, tensor power method, gate EM,
end-to-end recovery and the spectral initialisation of a GaussianMoE."""

import math
import warnings

import pytest
import torch
from scipy import integrate

from pyro_mm import GaussianMoE, IncrementalMM
from pyro_mm.models.gating import gate_log_probs
from pyro_mm.spectral import (
    GaussianMixtureScore,
    Link,
    NonGaussianInputWarning,
    ball_softmax_regression,
    fit_gate_em,
    fit_spectral_moe,
    gating_fit,
    glm_moe_truth,
    permutation_free_error,
    regressor_fit,
    sample_glm_moe,
    spectral_experts,
    spectral_init,
    standard_gaussian_pvalues,
    tensor_power_method,
    transform_constants,
)
from pyro_mm.spectral.transforms import TransformConstants
from pyro_mm.surrogates.softmax_regression import softmax_regression_loss


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are small: on a shared machine extra intra-op threads only add waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


LINK_FUNCTIONS = {
    "identity": lambda z: z,
    "sigmoid": lambda z: 1 / (1 + math.exp(-z)) if z > -700 else 0.0,
    "relu": lambda z: max(z, 0.0),
}


def _normal_expectation(fn):
    """E[fn(Z)] by adaptive quadrature split at 0 (independent of the library's quadrature)."""
    density = lambda z: fn(z) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    options = dict(epsabs=1e-12, epsrel=1e-10, limit=200)
    return (
        integrate.quad(density, -math.inf, 0, **options)[0]
        + integrate.quad(density, 0, math.inf, **options)[0]
    )


def _conditions(link, constants, sigma):
    """(E[h3 He1], E[h3 He2], E[h2 He1], E[h3 He3], E[h2 He2]) by scipy quadrature."""
    g = LINK_FUNCTIONS[link]
    a, b, c = constants.alpha, constants.beta, constants.gamma

    def h3(z):
        return g(z) ** 3 + a * g(z) ** 2 + (b + 3 * sigma**2) * g(z) + a * sigma**2

    def h2(z):
        return g(z) ** 2 + c * g(z) + sigma**2

    return (
        _normal_expectation(lambda z: h3(z) * z),
        _normal_expectation(lambda z: h3(z) * (z * z - 1)),
        _normal_expectation(lambda z: h2(z) * z),
        _normal_expectation(lambda z: h3(z) * (z**3 - 3 * z)),
        _normal_expectation(lambda z: h2(z) * (z * z - 1)),
    )


# ------------------------------------------------------------------------------- constants
@pytest.mark.parametrize("link", ["identity", "sigmoid", "relu"])
@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.5, 2.0])
def test_constants_satisfy_the_cancellation_conditions(link, sigma):
    constants = transform_constants(link, sigma)
    first, second, quadratic, c3, c2 = _conditions(link, constants, sigma)
    assert abs(first) < 1e-8 and abs(second) < 1e-8 and abs(quadratic) < 1e-8
    assert c3 == pytest.approx(constants.c3, abs=1e-8)
    assert c2 == pytest.approx(constants.c2, abs=1e-8)
    assert abs(c3) > 1e-3 and abs(c2) > 1e-3


@pytest.mark.parametrize("sigma", [0.1, 0.7])
def test_closed_form_constants(sigma):
    identity = transform_constants("identity", sigma)
    assert (identity.alpha, identity.gamma) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert identity.beta == pytest.approx(-3 * (1 + sigma**2), abs=1e-12)
    assert (identity.c3, identity.c2) == pytest.approx((6.0, 2.0), abs=1e-12)
    relu = transform_constants("relu", sigma)
    assert relu.alpha == pytest.approx(-3 * math.sqrt(math.pi / 2) / (math.pi - 2), abs=1e-12)
    assert relu.beta == pytest.approx(6 / (math.pi - 2) - 3 - 3 * sigma**2, abs=1e-12)
    assert relu.gamma == pytest.approx(-2 * math.sqrt(2 / math.pi), abs=1e-12)
    # sigmoid = 1/2 + odd: gamma = -1 and alpha = -3/2 make h2 even and h3 odd plus a constant.
    sigmoid = transform_constants("sigmoid", sigma)
    assert (sigmoid.alpha, sigmoid.gamma) == pytest.approx((-1.5, -1.0), abs=1e-12)


def test_papers_printed_relu_constants_violate_the_conditions():
    sigma = 0.1
    printed = TransformConstants(
        alpha=-3 * math.sqrt(2 / math.pi),
        beta=3 * (4 / math.pi - sigma**2 - 1),
        gamma=-2 * math.sqrt(2 / math.pi),
        c3=1.0,
        c2=1.0,
        link="relu",
        noise_std=sigma,
    )
    first, second, *_ = _conditions("relu", printed, sigma)
    assert max(abs(first), abs(second)) > 0.1


def test_invalid_links_and_noise_levels_are_rejected():
    with pytest.raises(ValueError, match="noise_std .* required"):
        transform_constants("identity", None)
    with pytest.raises(ValueError, match=">= 0"):
        transform_constants("identity", -0.1)
    with pytest.raises(ValueError, match="unknown link"):
        transform_constants("tanh", 0.1)
    with pytest.raises(ValueError, match="not \\(alpha, beta, gamma\\)-valid"):
        transform_constants(Link("square", torch.square), 0.1)  # even: E[g Z] = 0
    with pytest.raises(ValueError, match="c = .* near zero"):
        # sin(3z) has almost no Hermite content of order <= 3: c ~ 4e-16.
        transform_constants(Link("sin3", lambda z: torch.sin(3 * z)), 0.1)


# ---------------------------------------------------------------------------------- scores
def _batched(estimator, *tensors, parts=20):
    values = torch.stack([estimator(*chunk) for chunk in zip(*(t.chunk(parts) for t in tensors))])
    return values.mean(0), values.std(0) / math.sqrt(parts)


def test_score_functions_match_the_papers_formulas():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    score = GaussianMixtureScore.standard(3)
    eye = torch.eye(3, dtype=torch.float64)
    for row in x:
        one = row.unsqueeze(0)
        expected2 = torch.outer(row, row) - eye
        expected3 = torch.einsum("a,b,c->abc", row, row, row)
        for i, j, m in torch.cartesian_prod(*(torch.arange(3),) * 3).tolist():
            expected3[i, j, m] -= row[i] * eye[j, m] + row[j] * eye[i, m] + row[m] * eye[i, j]
        weight = torch.ones(1, dtype=torch.float64)
        assert torch.allclose(score.second_moment(one, weight), expected2, atol=1e-12)
        assert torch.allclose(score.whitened_third_moment(one, weight, eye), expected3, atol=1e-12)


@pytest.mark.parametrize("mixture", [False, True])
def test_stein_identities_by_monte_carlo(mixture):
    """E[f(x) S_m(x)] = E[grad^m f(x)] for f(x) = exp(b^T x): grad^m f = f b^(x)m."""
    generator = torch.Generator().manual_seed(1)
    num_rows, dim = 200_000, 3
    b = torch.tensor([0.3, -0.2, 0.25], dtype=torch.float64)
    if mixture:
        weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
        means = torch.tensor([[1.0, 0.0, 0.5], [-0.5, 0.5, 0.0]], dtype=torch.float64)
        covariances = torch.stack([torch.eye(dim), torch.diag(torch.tensor([0.5, 1.5, 1.0]))])
        score = GaussianMixtureScore(weights, means, covariances.double())
        component = torch.multinomial(weights, num_rows, True, generator=generator)
        noise = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
        roots = torch.linalg.cholesky(score.covariances)
        x = means[component] + (roots[component] @ noise.unsqueeze(-1)).squeeze(-1)
        mean_f = sum(
            w * torch.exp(b @ m + 0.5 * b @ c @ b)
            for w, m, c in zip(weights, means, score.covariances)
        )
    else:
        score = GaussianMixtureScore.standard(dim)
        x = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
        mean_f = torch.exp(0.5 * b @ b)
    f = torch.exp(x @ b)
    eye = torch.eye(dim, dtype=torch.float64)
    second, second_se = _batched(score.second_moment, x, f)
    third, third_se = _batched(lambda xc, fc: score.whitened_third_moment(xc, fc, eye), x, f)
    expected2 = mean_f * torch.outer(b, b)
    expected3 = mean_f * torch.einsum("a,b,c->abc", b, b, b)
    assert ((second - expected2).abs() <= 5 * second_se + 1e-4).all()
    assert ((third - expected3).abs() <= 5 * third_se + 1e-4).all()
    # ... and the check has teeth: dropping the correction term of S2 breaks it.
    assert ((second + mean_f * eye - expected2).abs() > 5 * second_se).any() or mixture


def _population_tensor_z(link, constants, seed=0, num_rows=200_000, sigma=0.3):
    """max |T3_hat - c sum_i pi_i a_i^3| / (its Monte Carlo standard error), orthogonal gate."""
    truth = glm_moe_truth(2, 4, link=link, noise_std=sigma, orthogonal_gate=True, seed=seed)
    x, y, _ = sample_glm_moe(truth, num_rows, seed=seed + 1)
    score = GaussianMixtureScore.standard(4)
    eye = torch.eye(4, dtype=torch.float64)
    cubic = constants.cubic(y)
    estimate, error = _batched(
        lambda xc, pc: score.whitened_third_moment(xc, pc - pc.mean(), eye), x, cubic
    )
    mixing = gate_log_probs(truth.gate, x).exp().mean(0)
    a = truth.experts
    target = constants.c3 * torch.einsum("i,ia,ib,ic->abc", mixing, a, a, a)
    return ((estimate - target).abs() / error).max().item()


@pytest.mark.parametrize("link", ["identity", "relu"])
def test_cubic_transform_gives_a_super_symmetric_tensor(link):
    assert _population_tensor_z(link, transform_constants(link, 0.3)) < 5


def test_papers_relu_transform_leaves_gate_terms_in_the_tensor():
    sigma = 0.3
    corrected = transform_constants("relu", sigma)
    printed = TransformConstants(
        -3 * math.sqrt(2 / math.pi),
        3 * (4 / math.pi - sigma**2 - 1),
        corrected.gamma,
        corrected.c3,
        corrected.c2,
        "relu",
        sigma,
    )
    assert _population_tensor_z("relu", printed) > 8


# ------------------------------------------------------------------------ tensor power method
def test_tensor_power_method_recovers_an_orthogonal_decomposition():
    generator = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    vectors = basis.T[:4]
    values = torch.tensor([3.0, -2.0, 1.5, 0.7], dtype=torch.float64)
    tensor = torch.einsum("i,ia,ib,ic->abc", values, vectors, vectors, vectors)
    result = tensor_power_method(tensor, 4, generator=generator)
    assert result.residual < 1e-10
    assert (result.eigenvalues > 0).all()
    # (-2, v) is the term (2, -v): the sign moves into the vector.
    signed = values.sign().unsqueeze(-1) * vectors
    for value, vector in zip(result.eigenvalues, result.eigenvectors):
        match = (signed @ vector).argmax()
        assert value == pytest.approx(values[match].abs().item(), abs=1e-10)
        assert torch.allclose(vector, signed[match], atol=1e-8)


def test_tensor_power_method_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cubical"):
        tensor_power_method(torch.zeros(2, 2, 3), 1)
    with pytest.raises(ValueError, match="rank"):
        tensor_power_method(torch.zeros(2, 2, 2), 3)


# ------------------------------------------------------------------------------ gate EM
def _soft_labels(seed, num_rows=500, dim=3, classes=3, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    weight = scale * torch.randn(classes - 1, dim, generator=generator, dtype=torch.float64)
    targets = torch.softmax(torch.nn.functional.pad(features @ weight.T, (0, 1)), -1)
    return features, targets


def test_ball_newton_satisfies_the_kkt_conditions_on_the_boundary():
    features, targets = _soft_labels(0)
    free, _ = ball_softmax_regression(features, targets)
    radius = 0.5 * free.norm().item()
    weight, on_boundary = ball_softmax_regression(features, targets, radius)
    assert on_boundary
    assert weight.norm().item() == pytest.approx(radius, rel=1e-9)
    weight = weight.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(softmax_regression_loss(weight, features, targets), weight)
    # KKT on a ball: grad f = -lambda W with lambda > 0.
    cosine = (gradient * weight).sum() / (gradient.norm() * weight.norm())
    assert cosine.item() == pytest.approx(-1.0, abs=1e-7)
    # and no feasible point does better (convex problem): try random points of the ball.
    generator = torch.Generator().manual_seed(1)
    best = softmax_regression_loss(weight.detach(), features, targets)
    for _ in range(50):
        other = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        other = other / other.norm() * radius * torch.rand(1, generator=generator).item() ** 0.2
        assert softmax_regression_loss(other, features, targets) >= best - 1e-12


def test_ball_newton_inside_the_ball_is_the_unconstrained_optimum():
    features, targets = _soft_labels(2)
    free, _ = ball_softmax_regression(features, targets)
    weight, on_boundary = ball_softmax_regression(features, targets, 2 * free.norm().item())
    assert not on_boundary and torch.equal(weight, free)


def test_gate_em_is_monotone_and_recovers_the_gate_with_true_experts():
    truth = glm_moe_truth(3, 6, noise_std=0.3, seed=4)
    x, y, _ = sample_glm_moe(truth, 4000, seed=5)
    residuals = y.unsqueeze(-1) - x @ truth.experts.T
    result = fit_gate_em(x, residuals, noise_variance=0.09, max_iter=50)
    trace = torch.tensor(result.log_likelihood)
    assert (trace[1:] >= trace[:-1] - 1e-10).all()
    assert result.converged
    assert gating_fit(result.gate, truth.gate) > 0.95
    estimated = fit_gate_em(x, residuals, noise_variance=None, max_iter=50)
    trace = torch.tensor(estimated.log_likelihood)
    assert (trace[1:] >= trace[:-1] - 1e-10).all()
    assert estimated.noise_variance == pytest.approx(0.09, rel=0.1)
    # A small ball binds: the gate ends on its boundary.
    bounded = fit_gate_em(x, residuals, noise_variance=0.09, radius=0.5, max_iter=20)
    assert bounded.on_boundary and bounded.gate.norm().item() == pytest.approx(0.5, rel=1e-8)


# -------------------------------------------------------------------------------- metrics
def test_metrics_are_permutation_and_reference_free():
    truth = glm_moe_truth(3, 5, seed=6)
    assert regressor_fit(truth.experts, truth.experts) == pytest.approx(1.0)
    assert permutation_free_error(truth.experts, truth.gate, truth.experts, truth.gate) == 0.0
    order = [2, 0, 1]
    full = torch.nn.functional.pad(truth.gate, (0, 0, 0, 1))[order]
    relabelled_gate = full[:-1] - full[-1]
    relabelled = truth.experts[order]
    assert regressor_fit(-relabelled, truth.experts) == pytest.approx(1.0)
    assert permutation_free_error(
        relabelled, relabelled_gate, truth.experts, truth.gate
    ) == pytest.approx(0.0, abs=1e-12)
    back = [order.index(i) for i in range(3)]
    assert gating_fit(relabelled_gate, truth.gate, back) == pytest.approx(1.0)
    assert permutation_free_error(truth.experts + 0.1, truth.gate, truth.experts, truth.gate) > 0


# ------------------------------------------------------------------------------ end to end
def _fits(seeds, orthogonal, num_rows=2000, link="identity", sigma=0.1):
    regressor, gating = [], []
    for seed in seeds:
        truth = glm_moe_truth(
            2, 10, link=link, noise_std=sigma, orthogonal_gate=orthogonal, seed=seed
        )
        x, y, _ = sample_glm_moe(truth, num_rows, seed=1000 + seed)
        fit = fit_spectral_moe(x, y, 2, link=link, noise_std=sigma, seed=seed)
        regressor.append(regressor_fit(fit.experts.directions, truth.experts))
        gating.append(gating_fit(fit.gate, truth.gate))
    return sum(regressor) / len(regressor), sum(gating) / len(gating)


@pytest.mark.filterwarnings("error::pyro_mm.spectral.NonGaussianInputWarning")
@pytest.mark.parametrize("orthogonal", [True, False])
def test_recovery_at_the_papers_setting_over_ten_seeds(orthogonal):
    regressor, gating = _fits(range(10), orthogonal)
    assert regressor >= 0.9 and gating >= 0.9


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pyro_mm.spectral.NonGaussianInputWarning")
@pytest.mark.parametrize("link", ["sigmoid", "relu"])
def test_recovery_with_nonlinear_links(link):
    regressor, gating = _fits(range(3), orthogonal=True, num_rows=20_000, link=link)
    assert regressor >= 0.9 and gating >= 0.9


def test_moe_params_map_the_papers_model_onto_gaussian_moe():
    truth = glm_moe_truth(2, 4, noise_std=0.2, seed=7)
    x, y, _ = sample_glm_moe(truth, 3000, seed=8)
    fit = fit_spectral_moe(x, y, 2, noise_std=0.2)
    params = fit.moe_params()
    model = GaussianMoE(2, 4).double()
    # The paper's likelihood written directly: softmax(w^T x, 0) and N(y; a_i^T x, sigma^2).
    log_gate = gate_log_probs(fit.gate, x)
    means = x @ fit.experts.directions.T
    log_normal = -0.5 * (math.log(2 * math.pi * 0.04) + (y.unsqueeze(-1) - means) ** 2 / 0.04)
    direct = torch.logsumexp(log_gate + log_normal, -1)
    assert torch.allclose(model.log_prob(x, y, params), direct, atol=1e-10)
    assert torch.equal(params.experts.weight[:, 0, 0], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="relu"):
        glm_moe_truth(2, 4, link="relu").moe_params()


# ----------------------------------------------------------------------- errors and warnings
def test_clear_errors_for_what_the_method_cannot_do():
    truth = glm_moe_truth(2, 3, noise_std=0.1, seed=9)
    x, y, _ = sample_glm_moe(truth, 500, seed=10)
    with pytest.raises(ValueError, match="num_experts <= in_features"):
        spectral_experts(x, y, 4, noise_std=0.1)
    with pytest.raises(ValueError, match="noise_std .* required"):
        fit_spectral_moe(x, y, 2)
    with pytest.raises(ValueError, match="> 0"):
        fit_spectral_moe(x, y, 2, noise_std=0.0)
    with pytest.raises(ValueError, match="rows"):
        spectral_experts(x, y[:-1], 2, noise_std=0.1)
    noise = torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="positive eigenvalue"):
        spectral_experts(x, noise, 3, noise_std=0.1)


def test_skewness_test_is_calibrated_on_a_subsample():
    """Large samples use a subsample for Mardia's skewness; it must be standardised on its own."""
    generator = torch.Generator().manual_seed(21)
    pvalues = [
        standard_gaussian_pvalues(
            torch.randn(40_000, 10, generator=generator, dtype=torch.float64)
        )["skewness"]
        for _ in range(8)
    ]
    assert min(pvalues) > 1e-3 and max(pvalues) > 0.1


def test_non_gaussian_inputs_warn_and_gaussian_inputs_do_not():
    generator = torch.Generator().manual_seed(11)
    gaussian = torch.randn(3000, 4, generator=generator, dtype=torch.float64)
    assert min(standard_gaussian_pvalues(gaussian).values()) > 1e-3
    y = gaussian[:, 0] + 0.1 * torch.randn(3000, generator=generator, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonGaussianInputWarning)
        spectral_experts(gaussian, y, 1, noise_std=0.1)
    skewed = torch.empty(3000, 4, dtype=torch.float64).exponential_(generator=generator) - 1.0
    with pytest.warns(NonGaussianInputWarning, match="skewness"):
        spectral_experts(skewed, skewed[:, 0], 1, noise_std=0.1)
    shifted = gaussian + 0.5
    with pytest.warns(NonGaussianInputWarning, match="mean"):
        spectral_experts(shifted, y, 1, noise_std=0.1)


# -------------------------------------------------------------------------- initialisation
def test_spectral_init_starts_incremental_mm_near_the_truth():
    truth = glm_moe_truth(3, 6, noise_std=0.3, orthogonal_gate=True, seed=12)
    x, y, _ = sample_glm_moe(truth, 6000, seed=13)
    model = GaussianMoE(3, 6).double()
    params = spectral_init(model, x, y, seed=0)
    slopes, intercepts = params.experts.weight[:, 0, 1:], params.experts.weight[:, 0, 0]
    assert regressor_fit(slopes, truth.experts) > 0.9
    assert intercepts.abs().max() < 0.15
    nll = lambda p: -model.log_prob(x, y, p).mean().item()  # noqa: E731
    one_expert = y.var(correction=0).item()  # a single constant expert, for scale
    assert (
        nll(params)
        < nll(truth.moe_params()) + 0.25
        < 0.5 * math.log(2 * math.pi * math.e * one_expert)
    )
    # The shared variance also absorbs the experts' estimation error: biased upward.
    assert 0.09 <= params.experts.variance.min() and params.experts.variance.max() < 0.2
    model.set_params(params)
    infer = IncrementalMM(model, init="current")
    assert math.isfinite(infer.step(x[:500], y[:500]))


def test_spectral_init_validates_the_model_and_sigma():
    x = torch.randn(200, 3, dtype=torch.float64)
    y = x[:, 0]
    with pytest.raises(ValueError, match="num_experts <= in_features"):
        spectral_init(GaussianMoE(4, 3).double(), x, y)
    with pytest.raises(ValueError, match="linear experts"):
        spectral_init(GaussianMoE(2, 3, expert_degree=2).double(), x, y)
    with pytest.raises(ValueError, match="one output"):
        spectral_init(GaussianMoE(2, 3, out_features=2).double(), x, torch.stack([y, y], -1))
    with pytest.raises(ValueError, match="sigma"):
        spectral_init(GaussianMoE(2, 3).double(), x, y, sigma=0.0)
    with pytest.raises(TypeError, match="GaussianMoE"):
        spectral_init(object(), x, y)
