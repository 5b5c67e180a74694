"""ArviZ InferenceData from MM, EM and SVI fits; the Laplace posterior; label switching."""

import subprocess
import sys
import warnings

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal

from pyro_mm import GaussianMoE, IncrementalMM, MultinomialMoE
from pyro_mm.datasets.synthetic import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.diagnostics import LaplacePosterior, align_draws, laplace_posterior, to_inference_data
from pyro_mm.infer import EM
from pyro_mm.infer.svi_fit import SVIFit
from pyro_mm.models.params import GaussianExpertParams, MoEParams, MultinomialExpertParams
from pyro_mm.models.priors import MoEPriors

NUM_DRAWS = 100


def _data(num_samples=200, in_features=1, seed=0):
    truth = gaussian_moe_truth(2, in_features, seed=seed)
    return sample_gaussian_moe(truth, num_samples, seed=seed + 100)


def _em_fit(num_experts, x, y, tol=1e-8):
    model = GaussianMoE(num_experts, x.shape[1])
    EM(model, tol=tol).fit(x, y, max_iter=3000, progress=False)
    return model


@pytest.fixture(scope="module")
def fits():
    """One data set fitted three ways: IncrementalMM + Laplace, EM (point), SVI + AutoNormal
    (through SVIFit, on the model with priors)."""
    x, y = _data()
    mm_model = GaussianMoE(2, 1)
    IncrementalMM(mm_model).fit(x, y, batch_size=50, epochs=20, progress=False)
    laplace = laplace_posterior(mm_model, x, y)

    em_model = _em_fit(2, x, y)

    svi_model = GaussianMoE(2, 1, priors=MoEPriors())
    svi = SVIFit(svi_model, guide=AutoNormal, optim_args={"lr": 0.05}, seed=0)
    svi.fit(x, y, batch_size=x.shape[0], epochs=150, progress=False)
    return {
        "data": (x, y),
        "models": {"mm": mm_model, "em": em_model, "svi": svi_model},
        "idata": {
            "mm": to_inference_data(mm_model, x, y, laplace, num_samples=NUM_DRAWS),
            "em": to_inference_data(em_model, x, y, num_samples=NUM_DRAWS),
            "svi": to_inference_data(svi_model, x, y, svi.guide, num_samples=NUM_DRAWS),
        },
    }


# ------------------------------------------------------------------------------ ArviZ
def test_plot_ppc_loo_and_compare_run_on_every_fit_method(fits):
    x, _ = fits["data"]
    kinds = {"mm": "laplace", "em": "point", "svi": "guide"}
    for name, idata in fits["idata"].items():
        assert idata.posterior.attrs["posterior_kind"] == kinds[name]
        axes = az.plot_ppc(idata, num_pp_samples=20, random_seed=0)
        assert len(axes.get_lines()) > 20
        plt.close("all")
        with warnings.catch_warnings():
            # A point estimate has identical draws: ArviZ warns about the Pareto shape.
            warnings.simplefilter("ignore", UserWarning)
            loo = az.loo(idata, pointwise=True)
        assert loo.n_samples == NUM_DRAWS and loo.n_data_points == x.shape[0]
        assert torch.isfinite(torch.tensor(loo.elpd_loo))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        comparison = az.compare(fits["idata"])
    assert sorted(comparison.index) == ["em", "mm", "svi"]
    # The point estimate's "LOO" is its in-sample log-likelihood (p_loo = 0): optimistic.
    assert comparison.loc["em", "p_loo"] == pytest.approx(0.0, abs=1e-9)
    assert comparison.loc["mm", "p_loo"] > 1.0 and comparison.loc["svi", "p_loo"] > 1.0


def test_groups_dims_and_coords(fits):
    x, y = fits["data"]
    idata = fits["idata"]["em"]
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    }
    post = idata.posterior
    assert post["gate_weight"].dims == ("chain", "draw", "gate_experts", "gate_features")
    assert post["expert_weight"].dims == (
        "chain",
        "draw",
        "experts",
        "outputs",
        "expert_features",
    )
    assert post["expert_variance"].dims == ("chain", "draw", "experts", "outputs")
    assert list(post["experts"].values) == [0, 1]
    assert list(post["gate_features"].values) == ["1", "x0"]
    assert list(post["outputs"].values) == ["y0"]
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs", "outputs")
    assert idata.posterior_predictive["y"].shape == (1, NUM_DRAWS, x.shape[0], 1)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    assert idata.constant_data["x"].dims == ("obs", "features")
    assert (idata.constant_data["x"].values == x.numpy()).all()
    assert (idata.observed_data["y"].values == y.numpy()).all()


def test_point_estimate_draws_match_the_model(fits):
    x, y = fits["data"]
    model, idata = fits["models"]["em"], fits["idata"]["em"]
    params = model.get_params()
    posterior = idata.posterior
    assert torch.allclose(torch.as_tensor(posterior["gate_weight"].values[0, 3]), params.gate)
    assert torch.allclose(
        torch.as_tensor(posterior["expert_variance"].values[0, -1]), params.experts.variance
    )
    log_lik = torch.as_tensor(idata.log_likelihood["y"].values[0])
    assert torch.allclose(log_lik, model.log_prob(x, y).detach().expand(NUM_DRAWS, -1))
    # Posterior-predictive draws follow p(y | x): standardised by the mixture's mean and
    # variance, they have mean 0 and second moment 1 (20,000 draws: tolerances are > 5 SE).
    with torch.no_grad():
        gate = model.gate_probs(x)
        means = (x @ params.experts.weight[:, 0, 1:].T) + params.experts.weight[:, 0, 0]
        mean = (gate * means).sum(-1)
        variance = (gate * (params.experts.variance[:, 0] + means.square())).sum(-1) - mean**2
    draws = torch.as_tensor(idata.posterior_predictive["y"].values[0, :, :, 0])
    standardised = (draws - mean) / variance.sqrt()
    assert abs(standardised.mean().item()) < 0.04
    assert abs(standardised.square().mean().item() - 1.0) < 0.08


def test_posterior_predictive_is_reproducible_by_seed(fits):
    x, y = fits["data"]
    model = fits["models"]["em"]
    first = to_inference_data(model, x, y, num_samples=5, seed=3)
    again = to_inference_data(model, x, y, num_samples=5, seed=3)
    other = to_inference_data(model, x, y, num_samples=5, seed=4)
    ppc = [idata.posterior_predictive["y"].values for idata in (first, again, other)]
    assert (ppc[0] == ppc[1]).all() and not (ppc[0] == ppc[2]).all()


def _two_far_apart_draws(model):
    """Two parameter draws of a 2-expert, 1-input Gaussian model whose outputs sit near 0 and
    near 50 (tiny variance), whatever the gate says."""
    gate = torch.zeros(2, 1, 2, dtype=torch.float64)
    weight = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    weight[1, :, 0, 0] = 50.0
    variance = torch.full((2, 2, 1), 1e-4, dtype=torch.float64)
    return {"gate_weight": gate, "expert_weight": weight, "expert_variance": variance}


class _ModelWithoutSampler(GaussianMoE):
    """A model with no sampler of its own: its posterior predictive goes through Predictive."""

    sample = None


@pytest.mark.parametrize("model_class", [GaussianMoE, _ModelWithoutSampler])
def test_each_predictive_draw_uses_its_own_parameter_draw(model_class):
    x, y = _data(num_samples=50)
    model = model_class(2, 1).double()
    idata = to_inference_data(model, x, y, _two_far_apart_draws(model), num_samples=2)
    predictive = torch.as_tensor(idata.posterior_predictive["y"].values[0, :, :, 0])
    assert predictive.shape == (2, 50)
    assert predictive[0].abs().max() < 0.1
    assert (predictive[1] - 50.0).abs().max() < 0.1


def test_model_sampler_and_predictive_draw_the_same_distribution(fits):
    # The model's own sampler and Pyro's Predictive (the path for a model without one) give
    # the same posterior predictive distribution: per row, the mean over 400 draws of each
    # differs by less than 5 standard errors of the difference.
    x, y = fits["data"]
    em = fits["models"]["em"]
    twin = _ModelWithoutSampler(2, 1).double()
    twin.set_params(em.get_params())
    draws = [
        torch.as_tensor(to_inference_data(m, x, y, num_samples=400).posterior_predictive.y.values)
        for m in (em, twin)
    ]
    mine, pyros = (d[0, :, :, 0] for d in draws)
    standard_error = ((mine.var(0) + pyros.var(0)) / 400).sqrt()
    assert ((mine.mean(0) - pyros.mean(0)).abs() < 5 * standard_error).float().mean() > 0.99
    assert abs(mine.var(0).mean() / pyros.var(0).mean() - 1) < 0.05


def test_multinomial_posterior_predictive_draws_class_labels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, dtype=torch.float64, generator=generator)
    model = MultinomialMoE(2, 2, 3).double()
    gate, weight = (
        2 * torch.randn(shape, dtype=torch.float64, generator=generator)
        for shape in [(1, 3), (2, 2, 3)]
    )
    model.set_params(MoEParams(gate=gate, experts=MultinomialExpertParams(weight=weight)))
    y, _ = model.sample(x, generator=generator)
    idata = to_inference_data(model, x, y, num_samples=200)
    predictive = torch.as_tensor(idata.posterior_predictive["y"].values[0])
    assert predictive.shape == (200, 300) and predictive.dtype == torch.int64
    assert predictive.min() >= 0 and predictive.max() <= 2
    # Class frequencies over the draws follow the predicted class probabilities.
    frequencies = torch.stack([(predictive == c).double().mean(0) for c in range(3)], -1)
    assert (frequencies - model.predict(x)).abs().mean() < 0.03


def _compare_numbers_of_experts(seed):
    x, y = _data(num_samples=500, in_features=2, seed=seed)
    idatas = {}
    for num_experts in (1, 2, 3):
        model = _em_fit(num_experts, x, y)
        idatas[f"K={num_experts}"] = to_inference_data(
            model, x, y, laplace_posterior(model, x, y), num_samples=NUM_DRAWS
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return az.compare(idatas)


def _assert_two_experts_preferred(comparison):
    elpd = comparison["elpd_loo"]
    assert elpd["K=2"] > elpd["K=1"]
    if comparison.index[0] != "K=2":
        # K=2 is no worse than the best model within the standard error of the difference.
        assert comparison.loc["K=2", "elpd_diff"] <= comparison.loc["K=2", "dse"]


def test_model_comparison_prefers_two_experts_on_two_expert_data():
    """Data from a two-expert model (500 rows, 2 inputs), EM fits with K = 1, 2, 3 and their
    Laplace posteriors: PSIS-LOO ranks K = 2 above K = 1 and no worse than K = 3."""
    _assert_two_experts_preferred(_compare_numbers_of_experts(seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_model_comparison_prefers_two_experts_over_seeds(seed):
    _assert_two_experts_preferred(_compare_numbers_of_experts(seed))


# ---------------------------------------------------------------------------- Laplace
def _nll_of_unconstrained(model, x, y, vector):
    """Full-data NLL at ``(gate, expert weight, log variance)`` flattened in site order,
    computed from ``model.log_prob`` (not through the Pyro trace the Laplace code uses)."""
    params = model.get_params()
    sizes = [params.gate.numel(), params.experts.weight.numel(), params.experts.variance.numel()]
    gate, weight, log_variance = torch.split(vector, sizes)
    at = MoEParams(
        gate=gate.reshape(params.gate.shape),
        experts=GaussianExpertParams(
            weight=weight.reshape(params.experts.weight.shape),
            variance=log_variance.exp().reshape(params.experts.variance.shape),
        ),
    )
    return -model.log_prob(x, y, at).sum()


def test_laplace_covariance_matches_a_finite_difference_hessian():
    x, y = _data(num_samples=100)
    model = _em_fit(2, x, y, tol=1e-10)
    laplace = laplace_posterior(model, x, y)
    assert isinstance(laplace, LaplacePosterior)
    assert laplace.sites.names == ("gate_weight", "expert_weight", "expert_variance")
    params = model.get_params()
    point = torch.cat(
        [
            params.gate.reshape(-1),
            params.experts.weight.reshape(-1),
            params.experts.variance.log().reshape(-1),
        ]
    )
    assert torch.allclose(laplace.loc, point, rtol=0, atol=1e-12)
    dim, step = point.numel(), 1e-4
    basis = torch.eye(dim, dtype=torch.float64) * step
    hessian = torch.empty(dim, dim, dtype=torch.float64)
    with torch.no_grad():
        for i in range(dim):
            for j in range(dim):
                values = [
                    _nll_of_unconstrained(model, x, y, point + si * basis[i] + sj * basis[j])
                    for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1))
                ]
                hessian[i, j] = (values[0] - values[1] - values[2] + values[3]) / (4 * step**2)
    assert laplace.num_clamped == 0
    relative = (laplace.hessian - hessian).norm() / hessian.norm()
    assert relative < 1e-6
    covariance = torch.linalg.inv(hessian)
    assert (laplace.covariance - covariance).norm() / covariance.norm() < 1e-5
    # EM converged: the point is a stationary point of the full-data NLL.
    assert laplace.mode_offset < 1e-3


def test_laplace_draws_have_the_laplace_mean_and_covariance():
    x, y = _data(num_samples=100)
    model = _em_fit(2, x, y)
    laplace = laplace_posterior(model, x, y)
    draws = laplace.sample(20000, seed=1)
    assert draws["expert_variance"].shape == (20000, 2, 1)
    assert (draws["expert_variance"] > 0).all()
    unconstrained = torch.cat(
        [
            draws["gate_weight"].reshape(20000, -1),
            draws["expert_weight"].reshape(20000, -1),
            draws["expert_variance"].log().reshape(20000, -1),
        ],
        dim=-1,
    )
    # Whitened by the Hessian's square root the draws are standard normal.
    root = laplace.eigenvectors * laplace.eigenvalues.sqrt()
    white = (unconstrained - laplace.loc) @ root
    assert white.mean(0).abs().max() < 0.05
    assert (
        white.T @ white / 20000 - torch.eye(white.shape[1], dtype=torch.float64)
    ).abs().max() < 0.06
    assert torch.equal(
        laplace.sample(3, seed=7)["gate_weight"], laplace.sample(3, seed=7)["gate_weight"]
    )


def test_laplace_regularises_a_flat_hessian_with_a_warning():
    x, y = _data(num_samples=100)
    single = _em_fit(1, x, y).get_params()
    # Two copies of the one-expert MLE: the likelihood no longer depends on the gate at all
    # (flat directions) and splitting the experts is a saddle direction.
    model = GaussianMoE(2, 1).double()
    model.set_params(
        MoEParams(
            gate=torch.zeros(1, 2, dtype=torch.float64),
            experts=GaussianExpertParams(
                weight=single.experts.weight.expand(2, -1, -1).clone(),
                variance=single.experts.variance.expand(2, -1).clone(),
            ),
        )
    )
    with pytest.warns(UserWarning, match="not positive definite"):
        laplace = laplace_posterior(model, x, y)
    assert laplace.num_clamped >= 2
    assert (laplace.eigenvalues >= 1e-2).all()
    covariance = laplace.covariance
    assert torch.allclose(covariance, covariance.T)
    assert torch.linalg.eigvalsh(covariance).min() > 0
    draws = laplace.sample(50)
    assert all(torch.isfinite(value).all() for value in draws.values())


def test_laplace_warns_when_the_point_is_not_a_mode():
    x, y = _data(num_samples=100)
    model = GaussianMoE(2, 1).double()  # random expert weights, never fitted
    with pytest.warns(UserWarning, match="standard deviations away"):
        # At a random point the Hessian is indefinite too; that warning is tested above.
        warnings.filterwarnings("ignore", message="the Hessian of the NLL is not positive")
        laplace = laplace_posterior(model, x, y)
    assert laplace.mode_offset > 3.0


# ---------------------------------------------------------------------- label switching
def _swap_experts(draws: dict) -> dict:
    """Relabels two experts: expert order reversed, gate re-referenced to the new last one."""
    return {
        "gate_weight": -draws["gate_weight"],
        "expert_weight": draws["expert_weight"].flip(1),
        "expert_variance": draws["expert_variance"].flip(1),
    }


def test_label_switched_draws_are_aligned_before_stacking():
    x, y = _data(num_samples=100)
    model = _em_fit(2, x, y)
    draws = laplace_posterior(model, x, y).sample(40, seed=2)
    swapped = _swap_experts(draws)
    mixed = {name: torch.cat([draws[name][:20], swapped[name][20:]]) for name in draws}
    clean = to_inference_data(model, x, y, draws, num_samples=2)
    relabelled = to_inference_data(model, x, y, mixed, num_samples=2)
    assert relabelled.posterior.attrs["posterior_kind"] == "samples"
    # The likelihood does not see labels ...
    assert (
        abs(relabelled.log_likelihood["y"].values - clean.log_likelihood["y"].values).max() < 1e-10
    )
    # ... and the stacked posterior has one labelling again.
    for name in ("gate_weight", "expert_weight", "expert_variance"):
        assert abs(relabelled.posterior[name].values - clean.posterior[name].values).max() < 1e-12


def test_align_draws_to_a_reference():
    x, y = _data(num_samples=100)
    params = _em_fit(2, x, y).get_params()
    swapped = MoEParams(
        gate=-params.gate,
        experts=GaussianExpertParams(
            weight=params.experts.weight.flip(0), variance=params.experts.variance.flip(0)
        ),
    )
    aligned = align_draws([swapped, params], reference=params)
    for draw in aligned:
        assert torch.allclose(draw.gate, params.gate)
        assert torch.allclose(draw.experts.weight, params.experts.weight)
    with pytest.raises(ValueError, match="at least one draw"):
        align_draws([])


# --------------------------------------------------------------------- errors, imports
def test_an_mcmc_run_keeps_its_chains(monkeypatch):
    # Pyro draws chains in parallel processes when it has CPUs to spare: sequentially here, as
    # on every machine.
    monkeypatch.setattr(pyro.infer.mcmc.api.mp, "cpu_count", lambda: 1)
    truth = gaussian_moe_truth(2, 2, seed=3)
    x, y = sample_gaussian_moe(truth, 150, seed=4)
    model = GaussianMoE(2, 2, priors={"gate_weight": dist.Normal(0.0, 3.0)}).double()
    model.set_params(truth)
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=30, warmup_steps=50, num_chains=2, disable_progbar=True)
    with pytest.raises(ValueError, match="no samples"):
        to_inference_data(model, x, y, posterior=mcmc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "chains will be drawn sequentially"
        mcmc.run(x, y)
    idata = to_inference_data(model, x, y, posterior=mcmc)
    assert idata.posterior.attrs["posterior_kind"] == "mcmc"
    assert (idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]) == (2, 30)
    by_chain = mcmc.get_samples(group_by_chain=True)["gate_weight"].reshape(2, 30, 1, 3)
    assert torch.equal(torch.as_tensor(idata.posterior["gate_weight"].values), by_chain)
    # Each (chain, draw) of the log-likelihood is that draw's, with the experts fixed.
    experts = model.get_params().experts
    for chain, draw in [(0, 0), (1, 7), (1, 29)]:
        params = MoEParams(gate=by_chain[chain, draw], experts=experts)
        expected = model.log_prob(x, y, params).numpy()
        assert idata.log_likelihood["y"].values[chain, draw] == pytest.approx(expected, rel=1e-12)
    rhat = az.rhat(idata, var_names=["gate_weight"])["gate_weight"].values
    assert ((rhat > 0.9) & (rhat < 1.2)).all()
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_bad_arguments_are_rejected_with_clear_errors(fits):
    x, y = fits["data"]
    model = fits["models"]["em"]
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(model, x, y, num_samples=1)
    with pytest.raises(TypeError, match="posterior must be"):
        to_inference_data(model, x, y, posterior=42)
    with pytest.raises(ValueError, match="no values for the parameter site"):
        to_inference_data(model, x, y, {"gate_weight": torch.zeros(3, 1, 2)})
    with pytest.raises(ValueError, match="feature_names has 2 names"):
        to_inference_data(model, x, y, feature_names=["a", "b"])
    with pytest.raises(ValueError, match="declares no priors"):
        to_inference_data(model, x, y, AutoNormal(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an unfitted model: not at a mode
        other_laplace = laplace_posterior(GaussianMoE(3, 1).double(), x, y)
    with pytest.raises(ValueError, match="other parameter sites"):
        to_inference_data(model, x, y, other_laplace)
    with pytest.raises(ValueError, match="x has 3 columns"):
        laplace_posterior(model, torch.zeros(5, 3, dtype=torch.float64), y[:5])
    with pytest.raises(ValueError, match="min_eigenvalue"):
        laplace_posterior(model, x, y, min_eigenvalue=0.0)


def test_unsupported_arviz_version_is_named(fits, monkeypatch):
    x, y = fits["data"]
    monkeypatch.setattr(az, "__version__", "1.0.0")
    with pytest.raises(ImportError, match=r"ArviZ >=0\.17, <1\.0.*1\.0\.0 is installed"):
        to_inference_data(fits["models"]["em"], x, y, num_samples=2)


def test_importing_pyro_mm_does_not_import_arviz():
    code = "import sys, pyro_mm, pyro_mm.diagnostics; print('arviz' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_parameter_sites_of_a_model_with_priors_are_read_without_drawing_from_the_priors():
    """The sites are traced at the model's current values: no prior draw (the global random
    state is untouched), and the values are the module's."""
    from pyro_mm.diagnostics.sites import parameter_sites

    truth = gaussian_moe_truth(2, 1, seed=0)
    x, y = sample_gaussian_moe(truth, 50, seed=1)
    model = GaussianMoE(2, 1, priors=MoEPriors()).double()
    model.set_params(truth)
    state = torch.get_rng_state()
    sites = parameter_sites(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(sites.kinds.values()) == {"sample"}
    for name, value in model.param_values().items():
        assert torch.equal(sites.values[model.site_name(name)], value)
