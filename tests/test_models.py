import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_mm import GaussianMoE
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.models import CallableFeatures, PolynomialFeatures
from pyro_mm.models.params import tree_leaves


def test_polynomial_features_have_one_intercept():
    x = torch.tensor([[2.0, 3.0]])
    features = PolynomialFeatures(2, degree=3)(x)
    assert features.tolist() == [[1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 27.0]]
    assert PolynomialFeatures(2, 3).num_features == 7
    assert PolynomialFeatures(4, 0)(torch.ones(5, 4)).shape == (5, 1)


def test_callable_features_checks_width():
    fmap = CallableFeatures(lambda x: torch.cat([torch.ones(len(x), 1), x.sin()], -1), 3)
    model = GaussianMoE(2, 2, expert_degree=fmap)
    assert model.features(torch.zeros(4, 2, dtype=model.dtype))[1].shape == (4, 3)
    with pytest.raises(ValueError, match="columns"):
        CallableFeatures(lambda x: x, 5)(torch.zeros(3, 2))
    # Its column of ones, when named, is the one the experts' ridge leaves alone.
    from pyro_mm.surrogates import expert_surrogate_for

    assert expert_surrogate_for(model).unpenalised_column is None
    named = CallableFeatures(fmap.fn, 3, intercept_column=0)
    assert expert_surrogate_for(GaussianMoE(2, 2, expert_degree=named)).unpenalised_column == 0
    for bad in (3, -1, 0.0, True):
        with pytest.raises(ValueError, match="intercept_column"):
            CallableFeatures(fmap.fn, 3, intercept_column=bad)


def _fitted_model(num_experts=3, in_features=2, out_features=2, seed=0):
    truth = gaussian_moe_truth(num_experts, in_features, out_features, seed=seed)
    model = GaussianMoE(num_experts, in_features, out_features).double()
    model.set_params(truth)
    return model, truth


def test_log_prob_matches_pyro_mixture_and_responsibilities_normalise():
    model, truth = _fitted_model()
    x, y = sample_gaussian_moe(truth, 50, seed=1)
    trace = pyro.poutine.trace(model).get_trace(x, y)
    site = trace.nodes["y"]
    expected = site["fn"].log_prob(site["value"])
    assert torch.allclose(model.log_prob(x, y), expected, atol=1e-12)
    assert torch.allclose(model.log_joint(x, y).logsumexp(-1), expected, atol=1e-12)
    resp = model.responsibilities(x, y)
    assert torch.allclose(resp.sum(-1), torch.ones(50, dtype=torch.float64))
    assert isinstance(site["fn"], dist.MixtureSameFamily)


def test_predict_is_the_mean_of_samples():
    model, truth = _fitted_model(out_features=1)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([model.sample(x.repeat(20000, 1), generator=generator)[0]])
    mc_mean = draws.reshape(20000, 3, 1).mean(0)
    assert torch.allclose(model.predict(x), mc_mean, atol=0.05)


def test_predictive_and_svi_work_on_the_same_object():
    model, truth = _fitted_model(num_experts=2, out_features=1)
    x, y = sample_gaussian_moe(truth, 500, seed=2)
    samples = Predictive(model, num_samples=7)(x[:11])
    assert samples["y"].shape == (7, 11, 1)
    fresh = GaussianMoE(2, 2).double()
    svi = SVI(fresh, lambda x, y=None: None, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(60)]
    assert losses[-1] < losses[0]
    assert set(pyro.get_param_store().keys()) == {"gate_weight", "expert_weight", "expert_variance"}


def _constant_model(num_experts, level):
    """A fitted-looking model whose every expert predicts ``level`` with a tiny variance."""
    model = GaussianMoE(num_experts, 1).double()
    params = model.get_params()
    params.experts.weight.zero_()[..., 0] = level
    params.experts.variance.fill_(1e-4)
    model.set_params(params)
    return model


def test_models_with_the_same_parameter_names_each_run_with_their_own_values():
    # Pyro's param store keys parameters by name: without care, the second model called would
    # run with (and keep) the first one's tensors, silently, or fail on their shapes.
    x = torch.randn(30, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first, second = _constant_model(2, 0.0), _constant_model(3, 50.0)
    kept = {id(model): model.get_params() for model in (first, second)}
    for model, level in ((first, 0.0), (second, 50.0), (first, 0.0), (second, 50.0)):
        draws = Predictive(model, num_samples=20)(x)["y"]
        assert (draws - level).abs().max() < 0.1
        trace = pyro.poutine.trace(model).get_trace(x)
        assert trace.nodes["expert_weight"]["value"].shape[0] == model.num_experts
    for model in (first, second):
        assert torch.equal(model.get_params().experts.weight, kept[id(model)].experts.weight)
    # The store holds the parameters of the model called last.
    assert pyro.get_param_store()["expert_weight"].shape[0] == 3


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_experts"):
        GaussianMoE(0, 2)
    with pytest.raises(ValueError, match="in_features"):
        GaussianMoE(2, 0)
    with pytest.raises(ValueError, match="out_features"):
        GaussianMoE(2, 2, out_features=0)
    with pytest.raises(TypeError, match="feature"):
        GaussianMoE(2, 2, gate_degree="two")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.experts.variance.fill_(-1.0), r"expert_variance has values outside"),
        (lambda p: p.gate.fill_(float("nan")), "gate_weight has non-finite values"),
        (lambda p: p.experts.weight.fill_(float("inf")), "expert_weight has non-finite values"),
    ],
)
def test_invalid_parameters_are_refused_before_any_write(change, message):
    # A negative variance used to be written as a NaN log-variance, silently.
    model, truth = _fitted_model(num_experts=2, out_features=1)
    before = model.get_params()
    bad = model.get_params()
    change(bad)
    with pytest.raises(ValueError, match=message):
        model.set_params(bad)
    named = {
        "gate_weight": bad.gate,
        "expert_weight": bad.experts.weight,
        "expert_variance": bad.experts.variance,
    }
    with pytest.raises(ValueError, match="has"):
        model.set_param_values(named)
    for left, right in zip(tree_leaves(model.get_params()), tree_leaves(before)):
        assert torch.equal(left, right)


def test_a_covariance_that_is_not_positive_definite_is_refused():
    from pyro_mm.models import FullCovarianceGaussianMoE

    model = FullCovarianceGaussianMoE(2, 1, 2).double()
    params = model.get_params()
    params.experts.covariance[1] = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expert_covariance has values outside .*PositiveDef"):
        model.set_params(params)
    with pytest.raises(ValueError, match=r"gate_weight must have shape \(1, 2\), got \(3, 2\)"):
        model.set_param_values({"gate_weight": torch.zeros(3, 2, dtype=torch.float64)})


def test_a_model_restored_from_its_state_dict_continues_from_its_fit():
    # torch's own save/load path keeps the fitted flag (extra state), so init="auto" starts
    # from the restored parameters instead of re-initialising by K-means.
    from pyro_mm import IncrementalMM

    truth = gaussian_moe_truth(2, 2, seed=3)
    x, y = sample_gaussian_moe(truth, 2000, seed=4)
    fitted = GaussianMoE(2, 2).double()
    IncrementalMM(fitted).fit(x, y, progress=False)
    state = fitted.state_dict()
    restored = GaussianMoE(2, 2).double()
    restored.load_state_dict(state)
    assert restored.fitted
    # A step returns the batch's NLL at the parameters it starts from.
    loss = IncrementalMM(restored).step(x[:256], y[:256])
    assert loss == pytest.approx(-fitted.log_prob(x[:256], y[:256]).mean().item(), rel=1e-12)
    fresh = GaussianMoE(2, 2).double()
    fresh.load_state_dict(GaussianMoE(2, 2).double().state_dict())
    assert not fresh.fitted
    # A state saved without the flag holds parameters given to the model: fitted, loaded
    # strictly.
    older = {name: value for name, value in state.items() if name != "_extra_state"}
    restored = GaussianMoE(2, 2).double()
    restored.load_state_dict(older)
    assert restored.fitted
