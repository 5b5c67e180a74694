"""Bad streams and faults: each either raises a clear error before any state changes, or is
recovered from in a documented way that the fit reports (ridge, variance floor, empty-expert
rule, skip policy with a counter).

Case                                     | What happens
---------------------------------------- | -----------------------------------------------------
NaN / inf rows in x or y                 | ValueError naming the rows, state unchanged
wrong width of x or y mid-stream         | ValueError naming the widths, state unchanged
x and y row counts differ                | ValueError, state unchanged
empty batch                              | ValueError, state unchanged
bad first batch                          | ValueError, the object stays uninitialised
huge magnitudes, representable squares   | fitted exactly like the rescaled data (equivariance)
huge magnitudes, overflowing likelihood  | ValueError (log-likelihood not finite), state unchanged
huge magnitudes, overflowing statistics  | FloatingPointError (statistics overflow), state unchanged
constant features (singular Gram)        | ridge / gate_eps: finite fit, same loss as without them
expert with no responsibility            | keeps its parameters, counted in empty_expert_steps
variance collapsing to zero              | floored at variance_floor, counted in floored_variances,
                                         | one RuntimeWarning per fit (also for EM)
any of the errors with on_bad_batch=skip | batch skipped, counted in skipped_batches, nan loss
label out of range (MultinomialMoE)      | ValueError naming the labels and rows, state unchanged
model converted to another dtype mid-fit | TypeError naming both dtypes, state unchanged (all fits)
step size outside (0, 1] from a schedule | ValueError naming gamma and the step, state unchanged
configuration errors with on_bad_batch   | raised all the same (the two rows above): not skipped
"""

import math
import warnings

import pytest
import torch
from helpers import assert_trees_identical

from pyro_mm import (
    EM,
    FiniteSumMM,
    FullCovarianceGaussianMoE,
    GaussianMoE,
    GradientEM,
    IncrementalMM,
    MirrorDescentEM,
    SVIFit,
)
from pyro_mm.datasets import gaussian_moe_stream, gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.datasets.synthetic import multinomial_moe_stream, multinomial_moe_truth
from pyro_mm.infer.state import tree_state
from pyro_mm.models.multinomial_moe import MultinomialMoE
from pyro_mm.models.params import GaussianExpertParams, MoEParams


def _state(infer):
    state = tree_state(infer.state_dict())
    state["history"]["wall_time"] = None
    return state


@pytest.fixture
def streaming():
    """An IncrementalMM three batches into a stream, with Polyak averaging running."""
    truth = gaussian_moe_truth(2, 3, seed=0)
    batches = list(gaussian_moe_stream(truth, 100, 5, seed=2))
    infer = IncrementalMM(GaussianMoE(2, 3), polyak_start=2)
    infer.fit(batches[:3], progress=False)
    return infer, batches[3:]


def _nan_x(x, y):
    x = x.clone()
    x[5, 1] = float("nan")
    return x, y


def _inf_y(x, y):
    y = y.clone()
    y[7, 0] = -float("inf")
    return x, y


BAD_BATCHES = {
    "NaN in x": (
        _nan_x,
        ValueError,
        r"x contains NaN values in 1 row\(s\), first at row\(s\) \[5\]",
    ),
    "inf in y": (
        _inf_y,
        ValueError,
        r"y contains infinite values in 1 row\(s\), first at row\(s\) \[7\]",
    ),
    "x too wide": (
        lambda x, y: (torch.cat([x, x[:, :1]], 1), y),
        ValueError,
        "x has 4 columns but the model was built with in_features=3",
    ),
    "y too wide": (
        lambda x, y: (x, torch.cat([y, y], 1)),
        ValueError,
        r"y must have shape \(N, 1\)",
    ),
    "rows differ": (lambda x, y: (x, y[:-1]), ValueError, "x has 100 rows but y has 99"),
    "empty batch": (lambda x, y: (x[:0], y[:0]), ValueError, r"x is an empty batch \(0 rows\)"),
    "text in x": (
        lambda x, y: ([["a"] * 3] * 100, y),
        TypeError,
        "x must be a tensor or array-like",
    ),
    "huge y": (
        lambda x, y: (x, y * 1e200),
        ValueError,
        r"log-likelihood is not finite at the current parameters \(100 of this rank's 100 rows",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_a_bad_batch_mid_stream_changes_nothing(streaming, case):
    infer, (good, _) = streaming
    make_bad, error, message = BAD_BATCHES[case]
    before = _state(infer)
    with pytest.raises(error, match=message):
        infer.step(*make_bad(*good))
    assert_trees_identical(_state(infer), before)
    assert math.isfinite(infer.step(*good))  # the stream goes on


def test_skip_policy_counts_bad_batches_and_fits_as_if_they_were_absent():
    truth = gaussian_moe_truth(2, 3, seed=0)
    good = list(gaussian_moe_stream(truth, 100, 6, seed=2))
    bad = [_nan_x(*good[0]), (good[1][0][:0], good[1][1][:0]), (good[2][0], good[2][1] * 1e200)]
    stream = good[:2] + bad[:2] + good[2:4] + bad[2:] + good[4:]
    skipping = IncrementalMM(GaussianMoE(2, 3), on_bad_batch="skip")
    with pytest.warns(RuntimeWarning, match="skipped a bad batch"):
        history = skipping.fit(stream, progress=False)
    reference = IncrementalMM(GaussianMoE(2, 3))
    reference.fit(good, progress=False)

    assert skipping.regularisation["skipped_batches"] == 3
    assert [math.isnan(loss) for loss in history.loss] == [False] * 2 + [True] * 2 + [False] * 2 + [
        True
    ] + [False] * 2
    assert skipping.num_steps == reference.num_steps == 6
    assert_trees_identical(tree_state(skipping.params), tree_state(reference.params))


def test_a_bad_first_batch_leaves_the_object_uninitialised():
    truth = gaussian_moe_truth(2, 3, seed=0)
    x, y = sample_gaussian_moe(truth, 100, seed=1)
    infer = IncrementalMM(GaussianMoE(2, 3))
    fresh = _state(infer)
    for bad in (_nan_x(x, y), (x * 1e200, y * 1e200)):
        with pytest.raises(ValueError):
            infer.step(*bad)
        assert infer.params is None
        assert_trees_identical(_state(infer), fresh)
    infer.step(x, y)
    assert infer.num_steps == 1


def test_an_overflowing_expert_system_solves_to_nan_instead_of_a_lapack_error():
    """Statistics that overflowed (the K-means start of a first batch at ``x * 1e200``) make an
    indefinite, non-finite system: its least-squares fallback raised MKL's internal-assert
    ``RuntimeError`` on this machine (AVX-512), so the bad first batch above failed with it
    instead of the ``ValueError`` the fit raises for a non-finite log-likelihood. The solve now
    returns NaN, which the callers' finiteness checks report."""
    from pyro_mm.surrogates.gaussian_expert import GaussianExpertStatistics, solve_gaussian_experts

    gram = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    gram[0] = math.inf
    stats = GaussianExpertStatistics(
        weight=torch.tensor([0.5, 0.5], dtype=torch.float64),
        gram=gram,
        cross=torch.ones(2, 1, 3, dtype=torch.float64),
        square=torch.ones(2, 1, dtype=torch.float64),
    )
    previous = GaussianExpertParams(
        weight=torch.zeros(2, 1, 3, dtype=torch.float64),
        variance=torch.ones(2, 1, dtype=torch.float64),
    )
    solved, _ = solve_gaussian_experts(stats, previous)
    assert torch.isnan(solved.weight).all()


def _overflowing_batch(family: str):
    """400 rows at ``x * 1e200`` (outputs too, when real) and a model of ``family``."""
    x, y = sample_gaussian_moe(gaussian_moe_truth(2, 3, seed=0), 400, seed=1)
    if family == "multinomial":
        return MultinomialMoE(2, 3, 2), x, (y[:, 0] > 0).long()
    return FullCovarianceGaussianMoE(2, 3, 2), x, torch.cat([y, 0.5 * y], 1)


def _fit_all(fitter, x, y):
    if isinstance(fitter, EM):
        return fitter.fit(x, y, max_iter=2, progress=False)
    return fitter.fit(x, y, batch_size=100, progress=False)


@pytest.mark.parametrize("method", [IncrementalMM, EM, MirrorDescentEM, FiniteSumMM])
@pytest.mark.parametrize("family", ["multinomial", "full covariance"])
def test_a_first_batch_whose_statistics_overflow_is_named_for_every_family(family, method):
    """The K-means start's expert statistics overflow at ``x * 1e200``: their solve raised
    torch's ``LinAlgError`` (``eigh`` for multinomial experts, ``cholesky`` for full
    covariances) from inside the start, for every fitting class. Now a ``ValueError`` says so
    before anything is initialised (Gaussian experts raised one already: the non-finite
    log-likelihood)."""
    model, x, y = _overflowing_batch(family)
    scaled_y = y if family == "multinomial" else y * 1e200
    fitter = method(model)
    with pytest.raises(ValueError, match="statistics overflow"):
        _fit_all(fitter, x * 1e200, scaled_y)
    assert fitter.params is None


@pytest.mark.parametrize("method", [IncrementalMM, MirrorDescentEM, FiniteSumMM])
def test_a_fitted_multinomial_model_fed_overflowing_inputs_raises_a_named_error(method):
    """From fitted parameters (``init="current"``) the batch at ``x * 1e200`` reached
    ``torch.linalg.cond`` (IncrementalMM's and FiniteSumMM's first-step conditioning check) or
    the multinomial experts' ``eigh`` (MirrorDescentEM) with non-finite statistics and raised
    torch's ``LinAlgError``; now the finiteness checks raise ``FloatingPointError`` and the model
    keeps its parameters."""
    model, x, y = _overflowing_batch("multinomial")
    EM(model).fit(x, y, max_iter=2, progress=False)
    before = model.get_params()
    fitter = method(model, init="current")
    with pytest.raises(FloatingPointError, match="overflow|non-finite"):
        _fit_all(fitter, x * 1e200, y)
    assert_trees_identical(tree_state(model.get_params()), tree_state(before))


def test_huge_but_representable_magnitudes_fit_exactly_like_rescaled_data():
    truth = gaussian_moe_truth(2, 3, seed=0)
    x, y = sample_gaussian_moe(truth, 1500, seed=1)
    plain, scaled = IncrementalMM(GaussianMoE(2, 3)), IncrementalMM(GaussianMoE(2, 3))
    for start in range(0, 1500, 300):
        plain.step(x[start : start + 300], y[start : start + 300])
        scaled.step(x[start : start + 300], 1e100 * y[start : start + 300])
    assert torch.allclose(scaled.params.gate, plain.params.gate, rtol=0, atol=1e-12)
    assert torch.allclose(
        scaled.params.experts.weight / 1e100, plain.params.experts.weight, rtol=1e-12, atol=0
    )
    assert torch.allclose(
        scaled.params.experts.variance / 1e200, plain.params.experts.variance, rtol=1e-12, atol=0
    )


def test_statistics_that_overflow_raise_before_any_change():
    """A huge column that the current parameters ignore keeps the likelihood finite, but its
    squares overflow the Gram statistics: the update is refused."""
    x, y = sample_gaussian_moe(gaussian_moe_truth(2, 3, seed=0), 200, seed=1)
    model = GaussianMoE(2, 3).double()
    model.set_params(
        MoEParams(
            gate=torch.tensor([[0.1, 1.0, -1.0, 0.0]], dtype=torch.float64),
            experts=GaussianExpertParams(
                weight=torch.tensor([[[0.0, 1.0, 2.0, 0.0]], [[1.0, -1.0, 0.5, 0.0]]]).double(),
                variance=torch.ones(2, 1, dtype=torch.float64),
            ),
        )
    )
    infer = IncrementalMM(model, init="current")
    infer.initialize(x[:100], y[:100])
    before = _state(infer)
    huge = x[100:].clone()
    huge[:, 2] = 1e200
    with pytest.raises(FloatingPointError, match="statistics overflow the model's dtype"):
        infer.step(huge, y[100:])
    assert_trees_identical(_state(infer), before)
    assert math.isfinite(infer.step(x[100:], y[100:]))


@pytest.mark.parametrize("constant", ["one column", "every column"])
def test_constant_features_are_regularised(constant):
    """A constant column duplicates the intercept (singular Gram matrices): the ridge and the
    gate's eps keep the solves definite; the fit is as good as without the column."""
    truth = gaussian_moe_truth(2, 3, seed=0)
    x, y = sample_gaussian_moe(truth, 3000, seed=1)
    if constant == "one column":
        padded = torch.cat([x, torch.full((3000, 1), 2.5, dtype=x.dtype)], 1)
        with_constant, without = IncrementalMM(GaussianMoE(2, 4)), IncrementalMM(GaussianMoE(2, 3))
        with pytest.warns(RuntimeWarning, match="condition number") as warned:
            for start in range(0, 3000, 300):
                with_constant.step(padded[start : start + 300], y[start : start + 300])
                without.step(x[start : start + 300], y[start : start + 300])
        # Already float64: the warning does not suggest it.
        assert not any("use float64" in str(w.message) for w in warned)
        assert abs(with_constant.evaluate_loss(padded, y) - without.evaluate_loss(x, y)) < 1e-6
    else:
        flat = torch.full_like(x, 2.5)
        with_constant = IncrementalMM(GaussianMoE(2, 3))
        losses = [
            with_constant.step(flat[start : start + 300], y[start : start + 300])
            for start in range(0, 3000, 300)
        ]
        assert all(math.isfinite(loss) for loss in losses)
        # Inputs carry no information: the fit is at most the marginal of y.
        assert with_constant.evaluate_loss(flat, y) < losses[0] + 1e-9
    params = with_constant.params
    assert all(torch.isfinite(t).all() for t in (params.gate, *vars(params.experts).values()))


def test_an_expert_without_responsibility_keeps_its_parameters_and_is_counted():
    truth = gaussian_moe_truth(3, 2, seed=0)
    start = MoEParams(gate=truth.gate.clone(), experts=truth.experts)
    start.gate[0] = torch.tensor([-1000.0, 0.0, 0.0], dtype=torch.float64)  # g_1(x) = 0 exactly
    model = GaussianMoE(3, 2).double()
    model.set_params(start)
    infer = IncrementalMM(model, init="current")
    losses = [infer.step(x, y) for x, y in gaussian_moe_stream(truth, 100, 30, seed=3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert infer.regularisation["empty_expert_steps"] == 30
    assert torch.equal(infer.params.experts.weight[0], truth.experts.weight[0])
    assert torch.equal(infer.params.experts.variance[0], truth.experts.variance[0])
    assert not torch.equal(infer.params.experts.weight[1:], truth.experts.weight[1:])


def test_a_collapsing_variance_is_floored_and_counted():
    """Noise-free outputs: every expert's residual variance tends to 0; it stays at the floor
    and the likelihood stays finite."""
    x, _ = sample_gaussian_moe(gaussian_moe_truth(2, 3, seed=0), 2000, seed=1)
    exact = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3
    infer = IncrementalMM(GaussianMoE(2, 3), variance_floor=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [
            infer.step(x[start : start + 200], exact[start : start + 200])
            for start in range(0, 2000, 200)
        ]
    assert all(math.isfinite(loss) for loss in losses)
    assert torch.equal(infer.params.experts.variance, torch.full((2, 1), 1e-6, dtype=torch.float64))
    assert infer.regularisation["floored_variances"] == 2 * len(losses)
    # Reported once (the counter keeps counting): outputs in too small units look the same.
    floored = [w for w in caught if "variance_floor=1e-06" in str(w.message)]
    assert len(floored) == 1 and floored[0].category is RuntimeWarning
    assert "rescale y" in str(floored[0].message)
    em = EM(GaussianMoE(2, 3), variance_floor=1e-6)
    with pytest.warns(RuntimeWarning, match="EM raised 2 expert variance"):
        em.fit(x, exact, max_iter=3)
    assert em.regularisation["floored_variances"] >= 2


@pytest.mark.parametrize("label", [3, -1])
def test_a_label_out_of_range_mid_stream_changes_nothing(label):
    truth = multinomial_moe_truth(2, 2, 3, seed=0)
    batches = list(multinomial_moe_stream(truth, 100, 4, seed=1))
    infer = IncrementalMM(MultinomialMoE(2, 2, 3), polyak_start=1)
    infer.fit(batches[:3], progress=False)
    x, y = batches[3]
    bad = y.clone()
    bad[9] = label
    before = _state(infer)
    with pytest.raises(
        ValueError, match=rf"must lie in \{{0, ..., 2\}}.*\[{label}\] at row\(s\) \[9\]"
    ):
        infer.step(x, bad)
    assert_trees_identical(_state(infer), before)
    assert math.isfinite(infer.step(x, y))


_FITS = {
    "IncrementalMM": lambda model: IncrementalMM(model, polyak_start=1),
    "EM": lambda model: EM(model),
    "MirrorDescentEM": lambda model: MirrorDescentEM(model, step_size=0.5),
    "GradientEM": lambda model: GradientEM(model, lr_gate=0.1, lr_experts=0.1),
    "SVIFit": lambda model: SVIFit(model, seed=0),
}


@pytest.mark.parametrize("method", sorted(_FITS))
def test_a_model_converted_to_another_dtype_mid_fit_is_named(method):
    # The fit keeps its statistics and parameters in its own dtype: a model cast with .float()
    # after the fit began would otherwise fail in a matrix product with a bare dtype error.
    truth = gaussian_moe_truth(2, 3, seed=0)
    batches = list(gaussian_moe_stream(truth, 100, 3, seed=2))
    model = GaussianMoE(2, 3)
    infer = _FITS[method](model)
    infer.step(*batches[0])
    model.float()
    before = _state(infer)
    with pytest.raises(TypeError, match="model's parameters are torch.float32 but this fit"):
        infer.step(*batches[1])
    assert_trees_identical(_state(infer), before)
    model.double()
    assert math.isfinite(infer.step(*batches[1]))


@pytest.mark.parametrize("gamma", [1.5, 0.0, -0.2, float("nan")])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_step_size_outside_the_unit_interval_is_refused_even_when_skipping(gamma, policy):
    # Outside (0, 1] the statistics update is not a convex combination: the running Gram
    # matrices could lose positive definiteness without any error. A bad schedule is the fit's
    # configuration, so the skip policy (meant for bad batches) must not swallow it.
    truth = gaussian_moe_truth(2, 3, seed=0)
    batches = list(gaussian_moe_stream(truth, 100, 3, seed=2))
    infer = IncrementalMM(
        GaussianMoE(2, 3), schedule=lambda n: 0.5 if n < 3 else gamma, on_bad_batch=policy
    )
    infer.fit(batches[:2], progress=False)
    before = _state(infer)
    with pytest.raises(ValueError, match=r"schedule returned gamma = .* at step 3; it must lie"):
        infer.step(*batches[2])
    assert_trees_identical(_state(infer), before)
    assert infer.regularisation["skipped_batches"] == 0


def test_a_model_converted_mid_fit_is_refused_even_when_skipping():
    truth = gaussian_moe_truth(2, 3, seed=0)
    batches = list(gaussian_moe_stream(truth, 100, 2, seed=2))
    model = GaussianMoE(2, 3)
    infer = IncrementalMM(model, on_bad_batch="skip")
    infer.step(*batches[0])
    model.float()
    with pytest.raises(TypeError, match="model's parameters are torch.float32"):
        infer.step(*batches[1])
    assert infer.regularisation["skipped_batches"] == 0
