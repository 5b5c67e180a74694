"""Bad input raises a clear error before any state changes."""

import warnings

import numpy as np
import pytest
import torch

from pyro_mm import GaussianMoE, IncrementalMM, MultinomialMoE
from pyro_mm.datasets import gaussian_moe_stream, gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.datasets.synthetic import multinomial_moe_truth


@pytest.fixture
def started():
    truth = gaussian_moe_truth(2, 3, 2, seed=0)
    x, y = sample_gaussian_moe(truth, 400, seed=1)
    infer = IncrementalMM(GaussianMoE(2, 3, 2))
    infer.step(x[:200], y[:200])
    return infer, x, y


def _snapshot(infer):
    return (
        infer.num_steps,
        infer.samples_seen,
        infer.params.gate.clone(),
        infer.statistics.experts.gram.clone(),
        infer.model.get_params().experts.weight.clone(),
    )


def _assert_unchanged(before, after):
    assert before[:2] == after[:2]
    for a, b in zip(before[2:], after[2:]):
        assert torch.equal(a, b)


def _bad_batches(x, y):
    nan_x = x[:50].clone()
    nan_x[7, 1] = float("nan")
    inf_y = y[:50].clone()
    inf_y[3, 0] = float("inf")
    return [
        ("x must have shape", x[:50].unsqueeze(0), y[:50]),
        ("4 columns", torch.cat([x[:50], x[:50, :1]], 1), y[:50]),
        ("y must have shape", x[:50], y[:50, :1]),
        ("x has 50 rows but y has 49", x[:50], y[:49]),
        ("x contains NaN values in 1 row", nan_x, y[:50]),
        ("y contains infinite values", x[:50], inf_y),
        ("x has dtype torch.int64", x[:50].long(), y[:50]),
        ("y has dtype torch.bool", x[:50], y[:50] > 0),
        ("y has dtype torch.int64.*for class labels use MultinomialMoE", x[:50], y[:50].long()),
        ("x must be numeric", np.array([["a", "b", "c"]] * 50), y[:50]),
        ("empty batch", x[:0], y[:0]),
    ]


@pytest.mark.parametrize("index", range(11))
def test_bad_batch_is_rejected_before_state_changes(started, index):
    infer, x, y = started
    message, bad_x, bad_y = _bad_batches(x, y)[index]
    before = _snapshot(infer)
    with pytest.raises((ValueError, TypeError), match=message):
        infer.step(bad_x, bad_y)
    _assert_unchanged(before, _snapshot(infer))
    infer.step(x[200:], y[200:])  # the fit goes on


def test_more_experts_than_first_batch_rows():
    truth = gaussian_moe_truth(2, 3, seed=0)
    x, y = sample_gaussian_moe(truth, 3, seed=1)
    infer = IncrementalMM(GaussianMoE(5, 3))
    with pytest.raises(ValueError, match="K = 5 experts need at least 5 samples"):
        infer.step(x, y)
    assert infer.params is None and infer.num_steps == 0


def test_options_are_validated():
    model = GaussianMoE(2, 3)
    with pytest.raises(ValueError, match="unknown softmax bound"):
        IncrementalMM(model, gate_bound="tight")
    with pytest.raises(ValueError, match="init"):
        IncrementalMM(model, init="random")
    with pytest.raises(ValueError, match="polyak_start"):
        IncrementalMM(model, polyak_start=0)
    with pytest.raises(TypeError, match="mixture of experts"):
        IncrementalMM(torch.nn.Linear(2, 2))


def test_numpy_and_list_input_is_accepted():
    truth = gaussian_moe_truth(2, 3, seed=0)
    x, y = sample_gaussian_moe(truth, 300, seed=1)
    infer = IncrementalMM(GaussianMoE(2, 3))
    loss = infer.step(x.numpy(), y.squeeze(-1).tolist())
    assert np.isfinite(loss)


def test_read_only_arrays_such_as_pandas_columns_are_copied_not_aliased():
    # pandas >= 3 hands out read-only views (DataFrame.to_numpy()); a tensor over them made
    # torch warn of undefined behaviour at every user's first fit on a DataFrame.
    pd = pytest.importorskip("pandas")
    from pyro_mm.validation import as_tensor

    truth = gaussian_moe_truth(2, 3, seed=0)
    x, y = sample_gaussian_moe(truth, 300, seed=1)
    read_only = x.numpy().copy()
    read_only.flags.writeable = False
    tensor = as_tensor("x", read_only)
    assert torch.equal(tensor, x) and not np.shares_memory(tensor.numpy(), read_only)
    writable = x.numpy()
    assert np.shares_memory(as_tensor("x", writable).numpy(), writable)  # no needless copy
    frame, series = pd.DataFrame(x.numpy()), pd.Series(y[:, 0].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loss = IncrementalMM(GaussianMoE(2, 3)).step(frame, series)
    assert loss == IncrementalMM(GaussianMoE(2, 3)).step(x, y)


@pytest.mark.parametrize("method", ["IncrementalMM", "EM", "SVIFit"])
def test_inputs_that_track_gradients_are_fitted_as_constants(method):
    # Data coming out of a network that tracks gradients: the K-means start reads it through
    # NumPy, which refuses such tensors, so every fit detaches its batches; the model's own
    # densities keep the gradient with respect to x.
    from pyro_mm import EM, SVIFit

    truth = gaussian_moe_truth(2, 3, seed=0)
    x, y = sample_gaussian_moe(truth, 300, seed=1)
    tracked = x.clone().requires_grad_(True)
    fits = {"IncrementalMM": IncrementalMM, "EM": EM, "SVIFit": SVIFit}
    model = GaussianMoE(2, 3)
    loss = fits[method](model).step(tracked, y)
    assert np.isfinite(loss)
    assert tracked.grad is None  # the fit's own gradients (SVIFit) never reach the data
    model.log_prob(tracked, y).sum().backward()
    assert tracked.grad is not None and torch.isfinite(tracked.grad).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: gaussian_moe_truth(0, 2), "num_experts must be a positive integer, got 0"),
        (lambda: gaussian_moe_truth(2, 0), "in_features must be a positive integer, got 0"),
        (lambda: gaussian_moe_truth(2, 2, noise_std=0.0), "noise_std must be a positive"),
        (lambda: gaussian_moe_truth(2, 2, gate_norm=-1.0), "gate_norm must be a finite number"),
        (lambda: sample_gaussian_moe(gaussian_moe_truth(2, 2), -1), "num_samples must be"),
        (lambda: gaussian_moe_stream(gaussian_moe_truth(2, 2), 0, 3), "batch_size must be"),
        (lambda: multinomial_moe_truth(2, 2, 1), "num_classes must be at least 2, got 1"),
    ],
)
def test_synthetic_data_sizes_are_checked(call, message):
    # They used to fail deep inside torch ("negative dimension -1") or, for in_features=0,
    # return a truth no model can hold.
    with pytest.raises(ValueError, match=message):
        call()


def test_sizes_accept_numpy_scalars_and_name_nan_and_inf():
    # Sizes often come from NumPy (an array's shape, a sum); NaN and inf are named, not left to
    # int()'s own error.
    from pyro_mm.validation import positive_integer

    truth = gaussian_moe_truth(np.int64(2), np.int64(3))
    x, _ = sample_gaussian_moe(truth, np.int64(5))
    assert x.shape == (5, 3)
    for bad in (float("nan"), float("inf"), np.float64("nan")):
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            positive_integer("num_samples", bad)


@pytest.mark.parametrize("family", ["gaussian", "full", "multinomial"])
def test_parameters_of_another_dtype_are_cast_to_the_models_like_the_inputs(family):
    """A float32 model evaluated at float64 parameters (a truth, a fitter's iterate) raised
    torch's ``expected m1 and m2 to have the same dtype``; the parameters are now cast to the
    model's dtype, as the inputs are, and give what the converted parameters give."""
    from pyro_mm.models.params import tree_to

    x = torch.randn(20, 2)
    if family == "multinomial":
        model, y = MultinomialMoE(2, 2, 3), torch.randint(0, 3, (20,))
    else:
        covariance = "full" if family == "full" else "diagonal"
        model = GaussianMoE(2, 2, 2, covariance=covariance)
        y = torch.randn(20, 2)
    params = tree_to(model.get_params(), torch.float64)
    converted = tree_to(params, torch.float32)
    calls = {
        "log_prob": lambda p: model.log_prob(x, y, p),
        "responsibilities": lambda p: model.responsibilities(x, y, p),
        "gate_probs": lambda p: model.gate_probs(x, p),
        "sample": lambda p: model.sample(x, p, generator=torch.Generator().manual_seed(0))[0],
        "predict": lambda p: model.predict(x, p),
    }
    for name, call in calls.items():
        result = call(params)
        assert result.dtype == call(converted).dtype, name
        torch.testing.assert_close(result, call(converted), msg=name)
