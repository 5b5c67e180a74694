"""The comparison interface: every method on the same stream, start and evaluation."""

import functools
import math

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDelta
from pytorch_optimizer import SophiaH

from pyro_mm import FitHistory, GaussianMoE, IncrementalMM, PowerDecay
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.infer.compare import (
    Method,
    compare_methods,
    fit_method,
    run_fit,
    tune_learning_rate,
)
from pyro_mm.infer.em import EM
from pyro_mm.infer.mirror_descent_em import MirrorDescentEM
from pyro_mm.infer.svi_fit import SVIFit
from pyro_mm.init import kmeans_init
from pyro_mm.metrics import mean_nll
from pyro_mm.models.priors import MoEPriors

MAKE_MODEL = functools.partial(GaussianMoE, 2, 2, 1)


@pytest.fixture
def tiny():
    truth = gaussian_moe_truth(2, 2, seed=11)
    x, y = sample_gaussian_moe(truth, 120, seed=12)
    return truth, x[:96], y[:96], x[96:], y[96:]


def _svi(optim, **extra):
    return lambda model, lr: SVIFit(model, optim=optim, optim_args={"lr": lr, **extra})


ALL_METHODS = [
    Method("IncrementalMM", lambda m: IncrementalMM(m)),
    Method("IncrementalMM+Polyak", lambda m: IncrementalMM(m, polyak_start=3)),
    Method("EM", lambda m: EM(m)),
    Method("MirrorDescentEM", lambda m: MirrorDescentEM(m, step_size=PowerDecay(1.0, 0.6))),
    Method(
        "SVI-MAP",
        lambda m, lr: SVIFit(m, AutoDelta, pyro.optim.Adam({"lr": lr})),
        (0.01, 0.05),
        MoEPriors(),
    ),
    Method("SVI-ML", lambda m, lr: SVIFit(m, None, pyro.optim.ClippedAdam({"lr": lr})), (0.05,)),
    Method("SGD", _svi(torch.optim.SGD), (0.05,)),
    Method("Adam", _svi(torch.optim.Adam), (0.05,)),
    Method("AdamW", _svi(torch.optim.AdamW), (0.05,)),
    Method("RMSProp", _svi(torch.optim.RMSprop), (0.01,)),
    Method("SophiaH", _svi(SophiaH, p=1.0), (0.01,)),
]


def test_every_method_runs_on_a_tiny_stream_from_the_same_start(tiny):
    truth, x, y, x_test, y_test = tiny
    start = kmeans_init(MAKE_MODEL().double(), x, y, seed=0)
    results = compare_methods(
        ALL_METHODS,
        MAKE_MODEL,
        x,
        y,
        x_test,
        y_test,
        truth=truth,
        init_params=start,
        batch_size=32,
        epochs=2,
        validation_fraction=0.25,
    )
    assert list(results) == [m.name for m in ALL_METHODS]
    first_batch_nll = mean_nll(MAKE_MODEL().double(), x[:32], y[:32], start)
    whole_nll = mean_nll(MAKE_MODEL().double(), x, y, start)
    for name, result in results.items():
        history = result.history
        assert isinstance(history, FitHistory)
        if name == "EM":
            # a batch method: one full-data iteration per pass
            assert len(history) == 2 and history.loss[0] == pytest.approx(whole_nll, rel=1e-10)
        else:
            # a streaming method: 3 batches per pass, the first one at the common start
            assert len(history) == 6 and history.samples_seen[-1] == 192
            assert history.loss[0] == pytest.approx(first_batch_nll, rel=1e-10)
        assert all(t2 >= t1 for t1, t2 in zip(history.wall_time, history.wall_time[1:]))
        assert set(result.metrics) >= {
            "heldout_nll",
            "prediction_mse",
            "prediction_mape",
            "prediction_nrmse",
            "estimation_mse",
            "estimation_mape",
            "estimation_nrmse",
            "parameter_error",
        }
        assert all(math.isfinite(v) for v in result.metrics.values()), name
        # the metrics are those of the parameters the method left in its model
        model = MAKE_MODEL().double()
        assert result.metrics["heldout_nll"] == pytest.approx(
            mean_nll(model, x_test, y_test, result.params), rel=1e-12
        )
    assert results["SVI-MAP"].search.grid == [0.01, 0.05]
    assert results["SVI-MAP"].learning_rate in (0.01, 0.05)
    assert results["IncrementalMM"].search is None
    assert results["IncrementalMM"].as_dict()["learning_rate"] is None


def test_tune_learning_rate_picks_the_lowest_validation_nll_and_scores_divergence_inf(tiny):
    _, x, y, _, _ = tiny
    start = kmeans_init(MAKE_MODEL().double(), x, y, seed=0)
    method = Method("SGD", _svi(torch.optim.SGD), (1e-4, 0.05, math.inf))
    search = tune_learning_rate(
        method, MAKE_MODEL, x, y, init_params=start, batch_size=24, epochs=2, seed=3
    )
    assert search.grid == [1e-4, 0.05, math.inf]
    assert math.isinf(search.validation_nll[2]) and math.inf in search.failures
    assert search.best == search.grid[search.validation_nll.index(min(search.validation_nll))]
    # the scores are the validation NLL of a model refitted at that learning rate
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    fit_rows, valid_rows = order[: len(x) - 19], order[len(x) - 19 :]
    model, _, _, _ = fit_method(
        method,
        MAKE_MODEL,
        x[fit_rows],
        y[fit_rows],
        init_params=start,
        batch_size=24,
        epochs=2,
        learning_rate=0.05,
    )
    assert search.validation_nll[1] == pytest.approx(
        mean_nll(model, x[valid_rows], y[valid_rows]), rel=1e-12
    )


def test_tuning_fails_clearly_when_every_learning_rate_diverges(tiny):
    _, x, y, _, _ = tiny
    start = kmeans_init(MAKE_MODEL().double(), x, y, seed=0)
    method = Method("SGD", _svi(torch.optim.SGD), (math.inf,))
    with pytest.raises(FloatingPointError, match="every learning rate"):
        tune_learning_rate(method, MAKE_MODEL, x, y, init_params=start, batch_size=24, epochs=1)


def test_run_fit_adapts_to_streaming_and_batch_verbs_and_rejects_others(tiny):
    _, x, y, _, _ = tiny
    model = MAKE_MODEL().double()
    with pytest.warns(UserWarning, match="did not converge"):
        history = run_fit(EM(model), x, y, batch_size=16, epochs=3)
    assert len(history) == 3

    class NoBudget:
        def fit(self, x, y):
            return FitHistory()

    with pytest.raises(TypeError, match="batch_size"):
        run_fit(NoBudget(), x, y, batch_size=16, epochs=1)

    class WrongReturn:
        def fit(self, x, y, *, batch_size, epochs, progress):
            return [1.0]

    with pytest.raises(TypeError, match="FitHistory"):
        run_fit(WrongReturn(), x, y, batch_size=16, epochs=1)


def test_compare_rejects_bad_arguments(tiny):
    _, x, y, x_test, y_test = tiny
    twice = [ALL_METHODS[0], ALL_METHODS[0]]
    with pytest.raises(ValueError, match="unique"):
        compare_methods(twice, MAKE_MODEL, x, y, x_test, y_test)
    with pytest.raises(ValueError, match="unknown methods"):
        compare_methods(
            ALL_METHODS[:1], MAKE_MODEL, x, y, x_test, y_test, learning_rates={"Adam": 0.1}
        )
    with pytest.raises(ValueError, match="needs a learning rate"):
        ALL_METHODS[6].make_fitter(MAKE_MODEL())
    with pytest.raises(ValueError, match="no learning rate"):
        ALL_METHODS[0].make_fitter(MAKE_MODEL(), 0.1)


def test_compare_methods_evaluates_a_classifier_by_accuracy_and_log_loss():
    """A MultinomialMoE comparison: class-probability metrics instead of regression errors."""
    from pyro_mm import MultinomialMoE
    from pyro_mm.datasets.synthetic import multinomial_moe_truth, sample_multinomial_moe
    from pyro_mm.metrics import classification_errors

    truth = multinomial_moe_truth(2, 2, 3, seed=5)
    x, y = sample_multinomial_moe(truth, 160, seed=6)
    make_model = functools.partial(MultinomialMoE, 2, 2, 3)
    methods = [
        Method("IncrementalMM", lambda m: IncrementalMM(m, ridge=1e-3)),
        Method("EM", lambda m: EM(m, ridge=1e-3)),
        Method("Adam", _svi(torch.optim.Adam), (0.05,)),
    ]
    results = compare_methods(
        methods, make_model, x[:120], y[:120], x[120:], y[120:], truth=truth, epochs=2
    )
    for name, result in results.items():
        metrics = result.metrics
        assert set(metrics) == {
            "heldout_nll",
            "accuracy",
            "log_loss",
            "estimation_kl",
            "estimation_accuracy",
            "parameter_error",
        }, name
        assert all(math.isfinite(v) for v in metrics.values()), name
        model = make_model().double()
        probs = model.predict(x[120:], result.params)
        direct = classification_errors(probs, y[120:])
        assert metrics["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
        assert metrics["log_loss"] == pytest.approx(metrics["heldout_nll"], rel=1e-10)
        assert metrics["log_loss"] == pytest.approx(
            mean_nll(model, x[120:], y[120:], result.params), rel=1e-10
        )
        true_probs = model.predict(x[120:], truth)
        kl = (true_probs * (true_probs.log() - probs.log())).sum(-1).mean().item()
        assert metrics["estimation_kl"] == pytest.approx(kl, rel=1e-10) and kl >= 0
    # the truth scores a zero KL and full agreement with itself
    model = make_model().double()
    model.set_params(truth)
    from pyro_mm.metrics import evaluate_fit

    own = evaluate_fit(model, x[120:], y[120:], truth)
    assert own["estimation_kl"] == pytest.approx(0.0, abs=1e-12)
    assert own["estimation_accuracy"] == 1.0 and own["parameter_error"] < 1e-12


def test_classification_errors_checks_shapes_and_counts_argmax_hits():
    from pyro_mm.metrics import classification_errors

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    errors = classification_errors(probs, torch.tensor([0, 2, 1]))
    assert errors["accuracy"] == pytest.approx(2 / 3)
    expected = -(math.log(0.7) + math.log(0.6) + math.log(0.4)) / 3
    assert errors["log_loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="probs must be"):
        classification_errors(probs, torch.tensor([0, 1]))
    # Labels read as floats count when whole; others, and labels out of range, are refused
    # (they were truncated, or failed inside gather with an index error).
    assert classification_errors(probs, [0.0, 2.0, 1.0]) == errors
    with pytest.raises(ValueError, match=r"labels must hold integer class labels.*\[2\.5\]"):
        classification_errors(probs, [0.0, 2.5, 1.0])
    with pytest.raises(ValueError, match=r"lie in \{0, ..., 2\}"):
        classification_errors(probs, [0, 3, 1])


def test_metrics_take_pandas_objects():
    # A DataFrame target made torch.as_tensor fail with "expected sequence of length"; the
    # metrics now read every array-like as the models do.
    pd = pytest.importorskip("pandas")
    from pyro_mm.metrics import classification_errors, regression_errors

    prediction, target = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [4.0]])
    expected = regression_errors(prediction, target)
    assert regression_errors(prediction, pd.DataFrame(target.numpy())) == expected
    assert regression_errors(pd.Series([1.0, 3.0]), pd.Series([2, 4])) == expected
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    assert classification_errors(pd.DataFrame(probs.numpy()), pd.Series([0, 0])) == {
        "accuracy": 0.5,
        "log_loss": classification_errors(probs, torch.tensor([0, 0]))["log_loss"],
    }


def test_bad_inputs_are_refused_before_the_first_fit(tiny):
    # A held-out set of the wrong width used to fail only after every method had been fitted.
    _, x_train, y_train, x_test, y_test = tiny
    built = []

    def counting(model):
        built.append(model)
        return IncrementalMM(model)

    methods = [Method("IncrementalMM", counting)]
    make_model = MAKE_MODEL
    with pytest.raises(ValueError, match="x has 1 columns"):
        compare_methods(methods, make_model, x_train, y_train, x_test[:, :1], y_test)
    with pytest.raises(ValueError, match="methods is empty"):
        compare_methods([], make_model, x_train, y_train, x_test, y_test)
    with pytest.raises(TypeError, match="must return a pyro_mm mixture of experts, got int"):
        compare_methods(methods, lambda priors=None: 42, x_train, y_train, x_test, y_test)
    assert built == []
