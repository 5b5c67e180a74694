"""Full-covariance Gaussian experts: densities, the surrogate (majorisation, statistics, argmin),
the regularised covariance estimate, MM/EM fits that recover correlated noise, and the spelling
``GaussianMoE(..., covariance="full")`` fitted by every inference class."""

import copy
import math
import warnings

import pyro
import pyro.optim
import pytest
import torch
from helpers import assert_trees_identical
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_mm import EM, GradientEM, IncrementalMM, MirrorDescentEM, SVIFit
from pyro_mm.infer import batch_mm
from pyro_mm.models import FullCovarianceExpertParams, FullCovarianceGaussianMoE, GaussianMoE
from pyro_mm.models.features import PolynomialFeatures
from pyro_mm.models.gating import gate_log_probs
from pyro_mm.models.params import GaussianExpertParams, MoEParams, tree_map
from pyro_mm.surrogates import (
    expert_surrogate_for,
    gate_surrogate_value,
    mixture_statistics,
    softmax_curvature,
)
from pyro_mm.surrogates.full_covariance_expert import (
    FullCovarianceExpertSurrogate,
    InverseWishartPrior,
    full_covariance_expert_statistics,
    solve_full_covariance_experts,
)

EPS = 1e-6


def _random_covariance(num_experts, out_features, generator):
    factor = torch.randn(num_experts, out_features, out_features, generator=generator).double()
    return factor @ factor.mT + 0.3 * torch.eye(out_features, dtype=torch.float64)


def _random_params(num_experts, gate_dim, out_features, expert_dim, generator, scale=1.0):
    return MoEParams(
        gate=scale * torch.randn(num_experts - 1, gate_dim, generator=generator).double(),
        experts=FullCovarianceExpertParams(
            weight=torch.randn(num_experts, out_features, expert_dim, generator=generator).double(),
            covariance=_random_covariance(num_experts, out_features, generator),
        ),
    )


def _setup(seed, num_experts=3, out_features=3):
    generator = torch.Generator().manual_seed(seed)
    features = PolynomialFeatures(2, 1)
    x = torch.randn(60, 2, generator=generator, dtype=torch.float64)
    y = 2 * torch.randn(60, out_features, generator=generator, dtype=torch.float64)
    u = features(x)
    anchor = _random_params(num_experts, u.shape[1], out_features, u.shape[1], generator, 0.5)
    return generator, u, y, anchor


def test_log_prob_matches_torch_and_pyro():
    generator, u, y, params = _setup(0)
    model = FullCovarianceGaussianMoE(3, 2, 3).double()
    model.set_params(params)
    x = u[:, 1:]
    log_gate = gate_log_probs(params.gate, u)
    means = torch.einsum("kqd,nd->nkq", params.experts.weight, u)
    expected = torch.logsumexp(
        log_gate
        + torch.distributions.MultivariateNormal(means, params.experts.covariance).log_prob(
            y.unsqueeze(1)
        ),
        -1,
    )
    assert torch.allclose(model.log_prob(x, y), expected, atol=1e-10)
    trace = pyro.poutine.trace(model).get_trace(x, y)
    assert math.isclose(trace.log_prob_sum().item(), expected.sum().item(), rel_tol=1e-10)
    assert torch.allclose(model.get_params().experts.covariance, params.experts.covariance)


def _nll(model, params, u, y):
    return -torch.logsumexp(model.log_joint_from_features(params, u, u, y), -1)


def _direct_surrogate(model, params, anchor, u, y, curvature):
    """Jensen's bound at the anchor's responsibilities plus the gate's quadratic bound."""
    tau = torch.softmax(model.log_joint_from_features(anchor, u, u, y), -1)
    entropy_term = (tau * tau.clamp_min(1e-300).log()).sum(-1)
    expert_term = -(tau * model.expert_log_prob(params.experts, u, y)).sum(-1)
    logits = torch.nn.functional.pad(u @ params.gate.T, (0, 1))
    anchor_logits = torch.nn.functional.pad(u @ anchor.gate.T, (0, 1))
    delta_u = u @ (params.gate - anchor.gate).T
    gate_probs = torch.softmax(anchor_logits, -1)[:, :-1]
    quadratic = ((delta_u @ curvature) * delta_u).sum(-1)
    quadratic = quadratic + EPS * (params.gate - anchor.gate).square().sum()
    lse = torch.logsumexp(anchor_logits, -1) + (gate_probs * delta_u).sum(-1) + 0.5 * quadratic
    return entropy_term + expert_term - (tau * logits).sum(-1) + lse


@pytest.mark.parametrize("seed", range(4))
def test_surrogate_majorises_touches_and_statistics_represent_it(seed):
    generator, u, y, anchor = _setup(seed)
    model = FullCovarianceGaussianMoE(3, 2, 3).double()
    curvature = softmax_curvature(2, "bohning")
    at_anchor = _direct_surrogate(model, anchor, anchor, u, y, curvature)
    assert torch.allclose(at_anchor, _nll(model, anchor, u, y), atol=1e-10)
    surrogate = FullCovarianceExpertSurrogate(ridge=0.0)
    stats, _ = mixture_statistics(surrogate, anchor, u, u, y, curvature, EPS)
    differences = []
    for _ in range(5):
        point = _random_params(3, u.shape[1], 3, u.shape[1], generator, 2.0)
        direct = _direct_surrogate(model, point, anchor, u, y, curvature)
        assert (direct - _nll(model, point, u, y)).min() >= -1e-10
        from_stats = gate_surrogate_value(point.gate, stats.gate, curvature, EPS)
        from_stats = from_stats + surrogate.value(point.experts, stats.experts)
        differences.append((from_stats - direct.mean()).item())
    assert max(differences) - min(differences) < 1e-10


@pytest.mark.parametrize("intercept", [None, 0])
@pytest.mark.parametrize(
    "prior", [None, InverseWishartPrior(torch.eye(3, dtype=torch.float64), 5.0, 30.0)]
)
def test_solve_is_the_argmin(prior, intercept):
    _, u, y, anchor = _setup(5)
    resp = torch.softmax(torch.randn(60, 3, generator=torch.Generator().manual_seed(1)), -1)
    surrogate = FullCovarianceExpertSurrogate(
        ridge=1e-3, covariance_prior=prior, unpenalised_column=intercept
    )
    stats = full_covariance_expert_statistics(resp.double(), u, y)
    solved, report = surrogate.solve(stats, anchor.experts)
    assert not report.empty_experts.any() and report.floored_variances == 0
    # Gradients in the weight and in an unconstrained (symmetric) parameterisation of Sigma.
    weight = solved.weight.clone().requires_grad_()
    covariance = solved.covariance.clone().requires_grad_()
    value = surrogate.value(FullCovarianceExpertParams(weight, covariance), stats)
    weight_grad, covariance_grad = torch.autograd.grad(value, [weight, covariance])
    assert weight_grad.abs().max() < 1e-9
    assert (covariance_grad + covariance_grad.mT).abs().max() < 1e-9
    # Any other point is worse.
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        other = tree_map(lambda t: t.clone(), solved)
        other.weight += 0.05 * torch.randn(other.weight.shape, generator=generator).double()
        other.covariance += 0.05 * _random_covariance(3, 3, generator)
        assert surrogate.value(other, stats) > surrogate.value(solved, stats)


def test_covariance_regularisation_floor_prior_and_empty_experts():
    _, u, y, anchor = _setup(6)
    resp = torch.zeros(60, 3, dtype=torch.float64)
    resp[:, 0] = 1.0
    # Outputs on a line: the residual covariance of expert 0 is singular, its null direction is
    # floored; experts 1 and 2 have no data and keep their previous parameters.
    line = torch.cat([y[:, :1], 2 * y[:, :1], -y[:, :1]], -1)
    stats = full_covariance_expert_statistics(resp, u[:, :1], line)
    previous = FullCovarianceExpertParams(
        anchor.experts.weight[:, :, :1], anchor.experts.covariance
    )
    solved, report = solve_full_covariance_experts(stats, previous, variance_floor=1e-4)
    assert report.empty_experts.tolist() == [False, True, True]
    assert report.floored_variances == 2
    assert torch.linalg.eigvalsh(solved.covariance[0]).min() >= 1e-4 - 1e-12
    assert torch.equal(solved.covariance[1:], anchor.experts.covariance[1:])
    # With (almost) no data the MAP covariance is the inverse-Wishart mode Psi / (nu + Q + 1).
    scale = _random_covariance(1, 3, torch.Generator().manual_seed(3))[0]
    prior = InverseWishartPrior(scale, 6.0, 1.0)
    tiny = full_covariance_expert_statistics(resp * 1e-7, u, y)
    solved, _ = solve_full_covariance_experts(tiny, anchor.experts, 0.0, 1e-9, 1e-9, prior)
    assert torch.allclose(solved.covariance[0], scale / 10.0, rtol=1e-4)


def _correlated_truth():
    weight = torch.tensor(
        [[[1.0, 2.0, 0.0], [-1.0, 0.0, 1.5]], [[-2.0, -1.0, 1.0], [2.0, 1.0, -1.0]]],
        dtype=torch.float64,
    )
    covariance = torch.tensor(
        [[[0.5, 0.4], [0.4, 0.5]], [[0.3, -0.2], [-0.2, 0.4]]], dtype=torch.float64
    )
    gate = torch.tensor([[0.0, 3.0, -2.0]], dtype=torch.float64)
    return MoEParams(gate=gate, experts=FullCovarianceExpertParams(weight, covariance))


def test_em_and_incremental_mm_recover_correlated_noise():
    truth = _correlated_truth()
    sampler = FullCovarianceGaussianMoE(2, 2, 2).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=generator, dtype=torch.float64)
    y, _ = sampler.sample(x, truth, generator=generator)
    start = MoEParams(
        gate=truth.gate + 0.5,
        experts=FullCovarianceExpertParams(
            truth.experts.weight + 0.3, torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
        ),
    )
    model = FullCovarianceGaussianMoE(2, 2, 2).double()
    model.set_params(start)
    mm = batch_mm(model, init="current")
    losses = [mm.step(x, y) for _ in range(40)]
    assert all(b <= a + 1e-10 for a, b in zip(losses, losses[1:]))
    fitted = mm.params.experts.covariance
    assert (fitted - truth.experts.covariance).abs().max() < 0.03
    # A diagonal model cannot represent the correlation: its fitted NLL stays higher.
    diagonal = GaussianMoE(2, 2, 2).double()
    diagonal.set_params(
        MoEParams(
            gate=truth.gate,
            experts=GaussianExpertParams(
                truth.experts.weight, truth.experts.covariance.diagonal(0, -2, -1)
            ),
        )
    )
    diagonal_mm = batch_mm(diagonal, init="current")
    diagonal_loss = min(diagonal_mm.step(x, y) for _ in range(20))
    assert losses[-1] < diagonal_loss - 0.3
    # The stream fit and exact EM use the same block through the registry.
    assert isinstance(expert_surrogate_for(model), FullCovarianceExpertSurrogate)
    stream_model = FullCovarianceGaussianMoE(2, 2, 2).double()
    stream_model.set_params(start)
    stream = IncrementalMM(stream_model, init="current")
    for begin in range(0, 4000, 200):
        stream.step(x[begin : begin + 200], y[begin : begin + 200])
    assert stream.evaluate_loss(x, y) < losses[-1] + 0.05
    em = EM(FullCovarianceGaussianMoE(2, 2, 2))
    em.model.set_params(model.get_params())
    em.fit(x, y, max_iter=5, progress=False)
    assert em.evaluate_loss(x, y) <= losses[-1] + 1e-8


def test_bad_prior_is_named():
    with pytest.raises(ValueError, match="positive definite"):
        InverseWishartPrior(-torch.eye(2), 4.0, 10.0)
    with pytest.raises(ValueError, match="df"):
        InverseWishartPrior(torch.eye(3), 1.0, 10.0)
    with pytest.raises(TypeError, match="InverseWishartPrior"):
        FullCovarianceExpertSurrogate(covariance_prior="iw")


# ------------------------------------------------------- GaussianMoE(..., covariance="full")
def test_the_covariance_option_builds_the_full_covariance_model():
    model = GaussianMoE(3, 2, 2, gate_degree=2, seed=4, covariance="full")
    assert type(model) is FullCovarianceGaussianMoE
    # A sibling class: its expert parameters are not the diagonal model's expert_variance.
    assert not isinstance(model, GaussianMoE) and not hasattr(model, "expert_variance")
    assert model.covariance == "full"
    assert repr(model) == (
        "FullCovarianceGaussianMoE(num_experts=3, in_features=2, out_features=2, covariance='full')"
    )
    explicit = FullCovarianceGaussianMoE(3, 2, 2, gate_degree=2, seed=4)
    assert_trees_identical(model.get_params(), explicit.get_params())
    assert model.gate_features == explicit.gate_features
    assert isinstance(expert_surrogate_for(model), FullCovarianceExpertSurrogate)
    assert type(copy.deepcopy(model)) is FullCovarianceGaussianMoE
    with_prior = GaussianMoE(
        2, 2, 2, priors={"expert_weight": pyro.distributions.Normal(0.0, 10.0)}, covariance="full"
    )
    assert type(with_prior) is FullCovarianceGaussianMoE and with_prior.has_priors

    for diagonal in (GaussianMoE(3, 2, 2), GaussianMoE(3, 2, 2, covariance="diagonal")):
        assert type(diagonal) is GaussianMoE and diagonal.covariance == "diagonal"
        assert "covariance='diagonal'" in repr(diagonal)
        assert type(copy.deepcopy(diagonal)) is GaussianMoE


@pytest.mark.parametrize("covariance", ["spherical", "Full", None])
def test_an_unknown_covariance_is_refused_naming_the_allowed_ones(covariance):
    with pytest.raises(ValueError, match=r"covariance must be one of \('diagonal', 'full'\)"):
        GaussianMoE(2, 2, covariance=covariance)


def test_a_subclass_of_the_diagonal_model_refuses_full_covariance():
    class Diagonal(GaussianMoE):
        pass

    with pytest.raises(ValueError, match="Diagonal has diagonal covariances"):
        Diagonal(2, 2, covariance="full")


def _correlated_data(num_rows=1200):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(num_rows, 2, generator=generator, dtype=torch.float64)
    y, _ = (
        FullCovarianceGaussianMoE(2, 2, 2)
        .double()
        .sample(x, _correlated_truth(), generator=generator)
    )
    return x, y


_FITS = {
    "IncrementalMM": lambda model: IncrementalMM(model, init="kmeans"),
    "EM": lambda model: EM(model, init="kmeans"),
    "MirrorDescentEM": lambda model: MirrorDescentEM(model, init="kmeans"),
    "GradientEM": lambda model: GradientEM(model, lr_gate=0.5, lr_experts=0.2, init="kmeans"),
    "SVIFit": lambda model: SVIFit(model, optim_args={"lr": 0.05}, init="kmeans"),
}


@pytest.mark.parametrize("method", list(_FITS))
def test_every_inference_class_fits_the_full_covariance_spelling(method):
    x, y = _correlated_data()
    model = GaussianMoE(2, 2, 2, covariance="full")
    fit = _FITS[method](model)
    fit.initialize(x[:200], y[:200])
    start = -model.log_prob(x, y).mean().item()
    for _ in range(3):
        for begin in range(0, x.shape[0], 200):
            fit.step(x[begin : begin + 200], y[begin : begin + 200])
    end = -model.log_prob(x, y).mean().item()
    assert math.isfinite(end) and end < start - 0.2
    assert type(fit.model) is FullCovarianceGaussianMoE
    assert fit.model.get_params().experts.covariance.shape == (2, 2, 2)


def test_the_spectral_start_of_diagonal_experts_refuses_full_covariance():
    x, y = _correlated_data(400)
    model = GaussianMoE(2, 2, 2, covariance="full")
    with pytest.raises(TypeError, match="spectral_init needs a GaussianMoE"):
        IncrementalMM(model, init="spectral").step(x, y)


def test_pyro_svi_and_predictive_run_on_the_full_covariance_spelling():
    x, y = _correlated_data(400)
    model = GaussianMoE(2, 2, 2, covariance="full").double()
    with pyro.get_param_store().scope():
        svi = SVI(model, lambda *args, **kwargs: None, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        losses = [svi.step(x, y) for _ in range(60)]
        assert losses[-1] < losses[0]
        samples = Predictive(model, num_samples=5)(x)["y"]
    assert samples.shape == (5, 400, 2)


def _nll_in_cholesky_coordinates(model, x, y, vector):
    """Full-data NLL at ``(gate, expert weight, Cholesky coordinates)`` flattened in site order:
    each covariance is ``L L^T`` with ``L`` lower triangular, read row by row from its
    ``Q (Q + 1) / 2`` coordinates, the diagonal's as logarithms (written out here, independently
    of the library's transforms)."""
    params = model.get_params()
    num_experts, size = params.experts.covariance.shape[:2]
    sizes = [params.gate.numel(), params.experts.weight.numel()]
    gate, weight, coordinates = torch.split(vector, sizes + [vector.numel() - sum(sizes)])
    rows, cols = torch.tril_indices(size, size)
    factor = torch.zeros(num_experts, size, size, dtype=vector.dtype)
    factor[:, rows, cols] = coordinates.reshape(num_experts, -1)
    diagonal = torch.arange(size)
    factor[:, diagonal, diagonal] = factor[:, diagonal, diagonal].exp()
    at = MoEParams(
        gate=gate.reshape(params.gate.shape),
        experts=FullCovarianceExpertParams(
            weight.reshape(params.experts.weight.shape), factor @ factor.transpose(-1, -2)
        ),
    )
    return -model.log_prob(x, y, at).sum()


def test_laplace_posterior_and_arviz_cover_full_covariance_experts():
    # A covariance matrix has no unconstrained bijection in torch (biject_to raises for
    # positive_definite): the Laplace coordinates are its Cholesky factor's free entries.
    import arviz as az

    from pyro_mm.diagnostics import laplace_posterior, num_free_parameters, to_inference_data

    x, y = _correlated_data(num_rows=300)
    model = FullCovarianceGaussianMoE(2, 2, 2).double()
    EM(model, init="kmeans", tol=1e-11).fit(x, y, max_iter=3000, progress=False)
    laplace = laplace_posterior(model, x, y)
    assert laplace.loc.numel() == num_free_parameters(model) == 3 + 12 + 2 * 3
    assert laplace.num_clamped == 0 and laplace.mode_offset < 1e-3
    covariance = model.get_params().experts.covariance
    assert torch.allclose(laplace.mode["expert_covariance"], covariance, rtol=0, atol=1e-12)
    # The Hessian is that of the NLL in the Cholesky coordinates (central differences).
    point, step = laplace.loc, 1e-4
    basis = torch.eye(point.numel(), dtype=torch.float64) * step
    with torch.no_grad():
        hessian = torch.stack(
            [
                torch.stack(
                    [
                        (
                            _nll_in_cholesky_coordinates(model, x, y, point + bi + bj)
                            - _nll_in_cholesky_coordinates(model, x, y, point + bi - bj)
                            - _nll_in_cholesky_coordinates(model, x, y, point - bi + bj)
                            + _nll_in_cholesky_coordinates(model, x, y, point - bi - bj)
                        )
                        / (4 * step**2)
                        for bj in basis
                    ]
                )
                for bi in basis
            ]
        )
    assert (laplace.hessian - hessian).norm() / hessian.norm() < 1e-6
    draws = laplace.sample(200, seed=0)["expert_covariance"]
    assert torch.allclose(draws, draws.transpose(-1, -2))
    assert torch.linalg.eigvalsh(draws).min() > 0
    idata = to_inference_data(model, x, y, laplace, num_samples=100)
    assert idata.posterior["expert_covariance"].shape == (1, 100, 2, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ on the Pareto shapes of 300 rows
        loo = az.loo(idata)
    assert math.isfinite(loo.elpd_loo) and loo.p_loo > 1.0


def test_a_wishart_prior_on_the_covariances_fits_by_map_and_gaussian_guides_are_refused():
    # A prior in float64 on a model built in float32 is rebuilt in the parameters' dtype; a
    # Wishart's covariance, precision and Cholesky factor must not all be passed back to it.
    from pyro.infer.autoguide import AutoDelta, AutoNormal

    from pyro_mm import MoEPriors
    from pyro_mm.diagnostics import to_inference_data

    wishart = pyro.distributions.Wishart(
        torch.tensor(4.0, dtype=torch.float64), covariance_matrix=torch.eye(2, dtype=torch.float64)
    ).expand([2])

    def make():
        priors = MoEPriors(overrides={"expert_covariance": wishart})
        return FullCovarianceGaussianMoE(2, 2, 2, priors=priors).double()

    x, y = _correlated_data(num_rows=600)
    model = make()
    fit = SVIFit(model, guide=AutoDelta, optim_args={"lr": 0.05}, init="kmeans", seed=0)
    history = fit.fit(x, y, batch_size=600, epochs=150, progress=False)
    assert history.loss[-1] < history.loss[0]
    covariance = model.get_params().experts.covariance
    assert torch.linalg.eigvalsh(covariance).min() > 0
    idata = to_inference_data(model, x, y, fit.guide, num_samples=4)
    assert idata.posterior["expert_covariance"].shape == (1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="no bijection to the support.*'expert_covariance'"):
        SVIFit(make(), guide=AutoNormal)


@pytest.mark.parametrize("constraint", ["positive_definite", "lower_cholesky"])
def test_triangular_bijection_log_jacobian_is_autograds(constraint):
    """The Laplace posterior carries a Wishart prior to the free entries of the covariance's
    Cholesky factor through this log-Jacobian (torch has none for these transforms): it is
    log|det| of the Jacobian from the free entries to the distinct entries of the matrix."""
    from torch.distributions import constraints

    from pyro_mm.diagnostics.laplace import _TriangularBijection

    size = 3
    bijection = _TriangularBijection(getattr(constraints, constraint), size)
    rows, cols = torch.tril_indices(size, size)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        free = torch.randn(size * (size + 1) // 2, generator=generator, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(lambda v: bijection(v)[rows, cols], free)
        expected = torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(bijection.log_abs_det_jacobian(free, bijection(free)), expected)
        assert torch.allclose(bijection.inv(bijection(free)), free)
