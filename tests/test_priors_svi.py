"""Priors on the models and SVIFit (maximum likelihood, MAP, variational Bayes)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import JitTrace_ELBO, Predictive, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLaplaceApproximation, AutoNormal

from pyro_mm import EM, ConstantStep, GaussianMoE, IncrementalMM
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.infer.svi_fit import SVIFit, needs_closure, needs_hessian_graph
from pyro_mm.models.params import tree_map
from pyro_mm.models.priors import MoEPriors


@pytest.fixture
def data():
    truth = gaussian_moe_truth(2, 2, seed=3)
    x, y = sample_gaussian_moe(truth, 400, seed=4)
    return truth, x, y


def _model(truth=None, priors=None):
    model = GaussianMoE(2, 2, priors=priors).double()
    if truth is not None:
        model.set_params(truth)
    return model


# ----------------------------------------------------------------------------------- priors
def test_priors_turn_parameters_into_latent_sites_of_the_right_shape(data):
    truth, x, y = data
    model = _model(truth, MoEPriors())
    trace = poutine.trace(model).get_trace(x, y)
    latent = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name != "data"
    }
    assert set(latent) == {"gate_weight", "expert_weight", "expert_variance"}
    for name, value in model.param_values().items():
        assert latent[name]["fn"].event_shape == value.shape
        assert latent[name]["value"].dtype == torch.float64
    assert (latent["expert_variance"]["value"] > 0).all()
    params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
    assert params == []


def test_without_priors_the_parameters_stay_pyro_params(data):
    truth, x, y = data
    trace = poutine.trace(_model(truth)).get_trace(x, y)
    assert {n for n, s in trace.nodes.items() if s["type"] == "param"} == {
        "gate_weight",
        "expert_weight",
        "expert_variance",
    }
    assert not _model().has_priors


def test_priors_log_density_is_the_sum_of_the_element_wise_priors(data):
    truth, x, y = data
    priors = MoEPriors(weight_scale=3.0, variance_concentration=2.5, variance_rate=0.7)
    model = _model(truth, priors)
    shaped = model.prior_distributions()
    expected = (
        torch.distributions.Normal(0.0, 3.0).log_prob(truth.gate).sum()
        + torch.distributions.Normal(0.0, 3.0).log_prob(truth.experts.weight).sum()
        + dist.InverseGamma(2.5, 0.7).log_prob(truth.experts.variance).sum()
    )
    total = (
        shaped["gate_weight"].log_prob(truth.gate)
        + shaped["expert_weight"].log_prob(truth.experts.weight)
        + shaped["expert_variance"].log_prob(truth.experts.variance)
    )
    assert torch.allclose(total, expected.double())


def test_a_dict_of_priors_covers_only_the_named_parameters(data):
    truth, x, y = data
    model = _model(truth, {"gate_weight": dist.Normal(0.0, 2.0)})
    trace = poutine.trace(model).get_trace(x, y)
    assert trace.nodes["gate_weight"]["type"] == "sample"
    assert trace.nodes["expert_weight"]["type"] == "param"


@pytest.mark.parametrize(
    "priors, error, message",
    [
        ({"gate": dist.Normal(0.0, 1.0)}, ValueError, "unknown parameter"),
        ({"expert_variance": dist.Normal(0.0, 1.0)}, ValueError, "support"),
        ({"gate_weight": dist.LogNormal(0.0, 1.0)}, ValueError, "support"),
        ({"gate_weight": dist.Normal(torch.zeros(3), 1.0)}, ValueError, "shape"),
        ({"gate_weight": torch.distributions.Normal(0.0, 1.0)}, TypeError, "pyro.distributions"),
        ({"gate_weight": 3.0}, TypeError, "distribution"),
        ("normal", TypeError, "priors must be"),
    ],
)
def test_bad_priors_are_rejected_before_any_change(priors, error, message):
    model = _model(priors=MoEPriors())
    with pytest.raises(error, match=message):
        model.set_priors(priors)
    assert isinstance(model._priors, MoEPriors)
    with pytest.raises(ValueError, match="weight_scale"):
        MoEPriors(weight_scale=0.0)


def test_incremental_mm_refuses_a_model_with_priors():
    with pytest.raises(ValueError, match="SVIFit"):
        IncrementalMM(_model(priors=MoEPriors()))


def test_set_param_values_accepts_guide_site_names_and_checks_shapes(data):
    truth, _, _ = data
    model = _model()
    model.set_param_values({"gate_weight": truth.gate, "expert_variance": truth.experts.variance})
    assert torch.equal(model.get_params().gate, truth.gate)
    with pytest.raises(ValueError, match="shape"):
        model.set_param_values({"gate_weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="unknown"):
        model.set_param_values({"bias": torch.zeros(1)})


# ---------------------------------------------------------------------------------- SVIFit
def test_maximum_likelihood_objective_is_the_mean_nll_of_the_batch(data):
    truth, x, y = data
    model = _model(truth)
    fit = SVIFit(model, optim=torch.optim.SGD, optim_args={"lr": 1e-3})
    before = -model.log_prob(x[:50], y[:50]).mean().item()
    fit.initialize(x[:50], y[:50])
    loss = fit.step(x[:50], y[:50])
    assert loss == pytest.approx(before, rel=1e-12)
    assert fit.last_objective == pytest.approx(before, rel=1e-12)


def test_map_objective_is_mean_nll_minus_log_prior_over_num_data(data):
    truth, x, y = data
    model = _model(truth, MoEPriors())
    fit = SVIFit(model, AutoDelta, pyro.optim.Adam({"lr": 1e-3}), num_data=400, init="current")
    log_prior = sum(
        prior.log_prob(model.param_values()[name])
        for name, prior in model.prior_distributions().items()
    )
    nll = -model.log_prob(x[:100], y[:100]).mean().item()
    loss = fit.step(x[:100], y[:100])
    assert loss == pytest.approx(nll, rel=1e-12)
    assert fit.last_objective == pytest.approx(nll - log_prior.item() / 400, rel=1e-10)


def test_svi_autodelta_with_priors_improves_the_loss_and_writes_the_map_into_the_model(data):
    _, x, y = data
    model = GaussianMoE(2, 2, priors=MoEPriors())
    fit = SVIFit(model, AutoDelta, pyro.optim.Adam({"lr": 0.1}), seed=1)
    history = fit.fit(x, y, batch_size=100, epochs=8, progress=False)
    objectives_start = history.loss[0]
    assert history.loss[-1] < objectives_start - 0.05
    assert fit.evaluate_loss(x, y) < objectives_start - 0.05
    median = fit.guide.median(x, y)
    for name, value in model.param_values().items():
        assert torch.allclose(value, median[name])
    assert all(math.isfinite(v) for v in history.loss)


def test_pyro_and_torch_adam_take_the_same_steps(data):
    truth, x, y = data
    losses = []
    for optim, args in [(pyro.optim.Adam({"lr": 0.02}), None), (torch.optim.Adam, {"lr": 0.02})]:
        fit = SVIFit(_model(truth), optim=optim, optim_args=args, init="current")
        losses.append(fit.fit(x, y, batch_size=100, epochs=3, progress=False).loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)


def test_sophia_h_uses_hessian_vector_products_and_decreases_the_loss(data):
    from pytorch_optimizer import SophiaH

    truth, x, y = data
    assert needs_hessian_graph(SophiaH) and not needs_hessian_graph(torch.optim.Adam)
    start = tree_map(lambda t: t + 0.3, truth)
    model = _model(start)
    fit = SVIFit(model, optim=SophiaH, optim_args={"lr": 0.05, "update_period": 1}, init="current")
    assert fit.create_graph
    history = fit.fit(x, y, batch_size=400, epochs=30, progress=False)
    hessian = fit.optimizer.state[fit._trained[0]]["hessian"]
    assert hessian.abs().sum() > 0
    assert history.loss[-1] < history.loss[0]
    assert all(p.grad is None for p in fit._trained)
    with pytest.raises(ValueError, match="torch optimiser class"):
        SVIFit(_model(), optim=pyro.optim.PyroOptim(SophiaH, {"lr": 0.01}))


def test_fits_of_models_with_the_same_names_do_not_share_parameters(data):
    truth, x, y = data
    first = SVIFit(_model(truth), optim=torch.optim.Adam, optim_args={"lr": 0.05}, init="current")
    first.fit(x, y, batch_size=200, epochs=2, progress=False)
    kept = first.model.get_params()
    second = SVIFit(_model(), optim=torch.optim.Adam, optim_args={"lr": 0.05})
    second.fit(x, y, batch_size=200, epochs=2, progress=False)
    assert torch.equal(first.model.get_params().gate, kept.gate)
    loss = first.step(x, y)
    assert loss == pytest.approx(-first.model.log_prob(x, y).mean().item(), abs=0.1)
    assert loss == pytest.approx(-_model(kept).log_prob(x, y).mean().item(), rel=1e-12)


def test_vectorised_draws_of_latent_parameters_are_refused_with_a_clear_error(data):
    # Predictive(parallel=True) draws every latent parameter with a leading batch dimension,
    # which the models' per-draw code cannot broadcast: a clear error, not a shape error from
    # deep inside (the sequential Predictive, and a model without priors, work).
    truth, x, y = data
    model = _model(truth, priors=MoEPriors())
    fit = SVIFit(model, guide=AutoNormal, optim_args={"lr": 0.05}, init="current", seed=0)
    fit.fit(x, y, batch_size=200, epochs=2, progress=False)
    pyro.clear_param_store()  # the guide's own parameters, not another fit's of the same names
    assert Predictive(model, guide=fit.guide, num_samples=5)(x)["y"].shape == (5, 400, 1)
    with pytest.raises(ValueError, match=r"leading batch dimensions.*parallel=False"):
        Predictive(model, guide=fit.guide, num_samples=5, parallel=True)(x)
    point = Predictive(_model(truth), num_samples=5, parallel=True)(x)["y"]
    assert point.shape == (5, 400, 1)


def test_svi_draws_are_reproducible_and_leave_the_global_random_state_alone(data):
    _, x, y = data
    global_state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        model = GaussianMoE(2, 2, priors=MoEPriors())
        fit = SVIFit(model, AutoNormal, guide_args={"init_scale": 0.05}, seed=7)
        runs.append(fit.fit(x, y, batch_size=100, epochs=2, progress=False).loss)
    assert runs[0] == runs[1]
    assert torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"priors": MoEPriors()}, ValueError, "need a guide"),
        ({"guide": AutoDelta}, ValueError, "no priors"),
        ({"optim": torch.optim.Adam(torch.nn.Linear(1, 1).parameters())}, TypeError, "optim"),
        ({"optim": pyro.optim.Adam({"lr": 0.1}), "optim_args": {"lr": 1}}, ValueError, "own"),
        ({"num_data": 0}, ValueError, "num_data"),
        ({"init": "random"}, ValueError, "init"),
        ({"optim": pyro.optim.PyroOptim(torch.optim.LBFGS, {"lr": 1})}, ValueError, "closure"),
        ({"optim": torch.optim.LBFGS, "create_graph": True}, ValueError, "closure"),
        ({"loss": TraceGraph_ELBO(), "create_graph": True}, ValueError, "differentiable_loss"),
        (
            {
                "priors": MoEPriors(),
                "guide": AutoNormal,
                "loss": Trace_ELBO(num_particles=2, vectorize_particles=True),
            },
            ValueError,
            "vectorize_particles=False",
        ),
    ],
)
def test_svi_fit_rejects_bad_arguments(kwargs, error, message):
    priors = kwargs.pop("priors", None)
    with pytest.raises(error, match=message):
        SVIFit(_model(priors=priors), **kwargs)


def test_a_jit_traced_elbo_fits_a_model_with_priors(data):
    # JitTrace_ELBO inserts tensors read outside pyro.param as constants and refuses those that
    # require grad: the module's own tensors of parameters with priors (latent sites, which
    # only shape the priors) must not, and get it back when the priors are removed.
    _, x, y = data
    model = _model(priors={"expert_variance": dist.InverseGamma(3.0, 2.0)})
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert grads == {
        "gate_weight_unconstrained": True,
        "expert_weight_unconstrained": True,
        "expert_variance_unconstrained": False,
    }
    model.set_priors(None)
    assert all(p.requires_grad for p in model.parameters())
    losses = []
    for loss in (Trace_ELBO(), JitTrace_ELBO()):
        fit = SVIFit(_model(priors=MoEPriors()), AutoDelta, loss=loss, optim_args={"lr": 0.05})
        losses.append(fit.fit(x, y, batch_size=100, epochs=3, progress=False).loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-8)


def test_lbfgs_steps_through_a_closure_and_reaches_the_maximum_likelihood(data):
    # LBFGS re-evaluates the objective in its line search: full-batch steps reach the MLE
    # (EM run to convergence from its own start, to 1e-10 relative change).
    truth, x, y = data
    assert needs_closure(torch.optim.LBFGS) and not needs_closure(torch.optim.Adam)
    reference = _model(truth)
    EM(reference, init="current", tol=1e-12).fit(x, y, max_iter=2000)
    mle = -reference.log_prob(x, y).mean().item()
    fit = SVIFit(
        _model(truth),
        optim=torch.optim.LBFGS,
        optim_args={"lr": 1.0, "max_iter": 20, "line_search_fn": "strong_wolfe"},
        init="current",
    )
    history = fit.fit(x, y, batch_size=400, epochs=15, progress=False)
    assert fit.evaluate_loss(x, y) == pytest.approx(mle, abs=1e-7)
    assert history.loss[-1] < history.loss[0]


def test_an_elbo_without_differentiable_loss_takes_the_same_steps(data):
    # TraceGraph_ELBO has only loss_and_grads; on a model without latent variables its
    # gradient is the likelihood's, as Trace_ELBO's.
    truth, x, y = data
    losses = []
    for loss in (Trace_ELBO(), TraceGraph_ELBO()):
        fit = SVIFit(_model(truth), loss=loss, optim_args={"lr": 0.02}, init="current")
        losses.append(fit.fit(x, y, batch_size=100, epochs=2, progress=False).loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)


def test_laplace_approximation_guide_writes_its_mode_and_gives_the_laplace_posterior(data):
    # AutoLaplaceApproximation fits a point mass (it has no median): the model holds that
    # point, the centre of the Laplace posterior it then builds. (It is the posterior mode in
    # unconstrained coordinates, so it differs from AutoDelta's MAP by the transforms'
    # Jacobian.)
    truth, x, y = data
    model = _model(truth, priors=MoEPriors())
    fit = SVIFit(model, AutoLaplaceApproximation, optim_args={"lr": 0.05}, init="current")
    history = fit.fit(x, y, batch_size=400, epochs=100, progress=False)
    assert history.loss[-1] < history.loss[0]
    posterior = fit.guide.laplace_approximation(x, y, num_data=400)
    centre = posterior.median(x, y, num_data=400)
    for name, value in model.param_values().items():
        assert torch.allclose(value, centre[model.site_name(name)], rtol=1e-12, atol=0)
    scale = posterior.get_posterior().scale_tril.diagonal()
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())


def test_laplace_posterior_with_priors_is_pyros_laplace_approximation(data):
    """With priors, laplace_posterior expands the log posterior in unconstrained coordinates
    (log-likelihood, log prior, log-Jacobian): at AutoLaplaceApproximation's mode its Hessian is
    the precision of Pyro's own Laplace approximation. priors=False gives the likelihood's
    Hessian alone, the same as for the model without priors at the same point."""
    from pyro_mm.diagnostics import laplace_posterior

    truth, x, y = data
    model = _model(truth, priors=MoEPriors())
    fit = SVIFit(model, AutoLaplaceApproximation, optim_args={"lr": 0.05}, init="current")
    fit.fit(x, y, batch_size=400, epochs=100, progress=False)
    pyro_posterior = fit.guide.laplace_approximation(x, y, num_data=400).get_posterior()
    scale_tril = pyro_posterior.scale_tril
    pyro_precision = torch.cholesky_inverse(scale_tril)
    ours = laplace_posterior(model, x, y)
    assert ours.includes_priors
    # Measured: 6e-13 apart, the precision's largest entry 916.
    assert (ours.hessian - pyro_precision).abs().max() < 1e-9 * pyro_precision.abs().max()
    assert torch.allclose(ours.loc, pyro_posterior.loc, rtol=1e-10, atol=1e-12)

    likelihood_only = laplace_posterior(model, x, y, priors=False)
    assert not likelihood_only.includes_priors
    without_priors = _model(priors=None)
    without_priors.set_params(model.get_params())
    reference = laplace_posterior(without_priors, x, y)
    assert torch.allclose(likelihood_only.hessian, reference.hessian, rtol=1e-12, atol=1e-9)
    # The priors and the log-variances' Jacobian do change the curvature (measured: by 4.1).
    assert (ours.hessian - reference.hessian).abs().max() > 1.0


def test_a_diverging_step_restores_the_parameters(data):
    truth, x, y = data
    model = _model(truth)
    fit = SVIFit(model, optim=torch.optim.SGD, optim_args={"lr": math.inf}, init="current")
    with pytest.raises(FloatingPointError, match="restored"):
        fit.step(x, y)
    assert torch.equal(model.get_params().gate, truth.gate)


@pytest.mark.slow
def test_autonormal_posterior_mean_is_near_the_mle_on_a_large_data_set():
    truth = gaussian_moe_truth(2, 1, seed=5)
    x, y = sample_gaussian_moe(truth, 4000, seed=6)
    # The MLE by exact (full-batch) MM iterations from the truth; checked by its gradient.
    reference = GaussianMoE(2, 1).double()
    reference.set_params(truth)
    mm = IncrementalMM(reference, schedule=ConstantStep(1.0), init="current")
    mm.fit(x, y, batch_size=4000, epochs=300, progress=False)
    mle = reference.param_values()
    leaves = {n: v.clone().requires_grad_() for n, v in mle.items()}
    nll = -GaussianMoE(2, 1).double().log_prob(x, y, _as_params(leaves)).mean()
    grads = torch.autograd.grad(nll, list(leaves.values()))
    assert max(g.abs().max().item() for g in grads) < 1e-6

    model = GaussianMoE(2, 1, priors=MoEPriors()).double()
    model.set_params(tree_map(lambda t: t * 1.1, truth))
    fit = SVIFit(
        model,
        AutoNormal,
        pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.993}),
        guide_args={"init_scale": 0.01},
        init="current",
        seed=0,
    )
    fit.fit(x, y, batch_size=4000, epochs=500, progress=False)
    posterior_mean = fit.guide.median(x, y)  # = the mean for real sites
    for name, value in mle.items():
        # posterior standard deviation (for the variances: the log-scale one times the value)
        scale = getattr(fit.guide.scales, name).detach()
        spread = scale * (value if name == "expert_variance" else 1.0)
        error = (posterior_mean[name] - value).abs()
        assert (error < 0.5 * spread).all(), (name, error, spread)
        # a concentrated posterior: the start (10% off the truth) was many spreads away
        assert (spread < 0.15).all(), (name, spread)


def _as_params(values):
    from pyro_mm.models.params import GaussianExpertParams, MoEParams

    return MoEParams(
        gate=values["gate_weight"],
        experts=GaussianExpertParams(
            weight=values["expert_weight"], variance=values["expert_variance"]
        ),
    )
