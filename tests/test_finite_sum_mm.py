"""FiniteSumMM: incremental MM whose mini-batches' statistics are kept and replaced (MISO)."""

import functools
import io

import pytest
import torch

from pyro_mm import FiniteSumMM, MultinomialMoE
from pyro_mm.datasets.synthetic import multinomial_moe_truth, sample_multinomial_moe
from pyro_mm.infer import batch_mm
from pyro_mm.init import kmeans_init
from pyro_mm.models.params import MoEParams, tree_map
from pyro_mm.surrogates.gate import gate_surrogate_value
from pyro_mm.surrogates.penalties import CoefficientPenalty

RIDGE = 1e-3


def _data(num_rows=300, seed=1):
    truth = multinomial_moe_truth(3, 2, 3, gate_norm=2.0, expert_scale=2.0, seed=0)
    x, y = sample_multinomial_moe(truth, num_rows, seed=seed)
    return x, y


def _start(x, y):
    model = MultinomialMoE(3, 2, 3).double()
    model.set_params(kmeans_init(model, x, y, seed=0))
    return model


def _max_difference(a: MoEParams, b: MoEParams) -> float:
    return max(
        (p - q).abs().max().item()
        for p, q in zip(
            [a.gate, *vars(a.experts).values()], [b.gate, *vars(b.experts).values()], strict=True
        )
    )


def _models_at(params: MoEParams, count: int) -> list:
    """``count`` separate MultinomialMoE(3, 2, 3) models, each holding ``params``."""
    models = [MultinomialMoE(3, 2, 3).double() for _ in range(count)]
    for model in models:
        model.set_params(params)
    return models


def test_one_batch_of_all_rows_is_batch_mm():
    x, y = _data()
    finite, batch, again = _models_at(_start(x, y).get_params(), 3)
    fs = FiniteSumMM(finite, ridge=RIDGE, init="current")
    mm = batch_mm(batch, ridge=RIDGE, init="current")
    for _ in range(4):
        assert fs.step(x, y, 0) == pytest.approx(mm.step(x, y), rel=1e-12)
    assert _max_difference(fs.params, mm.params) < 1e-10
    # fit with batch_size = all rows does the same
    FiniteSumMM(again, ridge=RIDGE, init="current").fit(x, y, batch_size=len(x), epochs=4)
    assert _max_difference(again.get_params(), mm.params) < 1e-10


def _surrogate_values(fs: FiniteSumMM, params: MoEParams, stats) -> torch.Tensor:
    """The statistics' part of the surrogate at ``params`` (penalties included)."""
    gate = gate_surrogate_value(params.gate, stats.gate, fs.curvature, fs.gate_eps)
    return gate + fs.expert_surrogate.value(params.experts, stats.experts)


def _penalty(fs: FiniteSumMM, params: MoEParams) -> torch.Tensor:
    return 0.5 * fs.gate_eps * params.gate.square().sum() + 0.5 * fs.ridge * (
        params.experts.weight.square().sum()
    )


def _assert_surrogate_majorises(fs, model, x, y, anchors, losses) -> float:
    """The full-data MISO surrogate ``G_n(theta) = sum_b w_b [f_b(theta_b) + V(theta; S_b) -
    V(theta_b; S_b) + pen(theta_b)]`` at the iterate, from the batches' anchors ``theta_b``
    and their losses ``f_b(theta_b)``; asserts it is above the penalised objective there.

    All in the coordinates the iteration runs in (centred when ``fs.centring`` is set): its
    statistics are of those regressors, and its penalty (the bound's ``eps`` term included) is
    on their coefficients."""
    if fs.centring is None:  # multinomial experts: their ridge covers the intercepts

        def centred(params):
            return params
    else:
        centred = functools.partial(fs.centring.centred_params, model=model)
    theta, value = centred(fs.params), 0.0
    for b, (stats, rows) in fs.batch_statistics.items():
        anchor = centred(anchors[b])
        constant = losses[b] + _penalty(fs, anchor) - _surrogate_values(fs, anchor, stats)
        value = value + rows / len(x) * (constant + _surrogate_values(fs, theta, stats))
    nll = -model.log_prob(x, y).mean()
    assert nll + _penalty(fs, theta) <= value + 1e-10
    return float(value)


@pytest.mark.parametrize("passes, repeats", [(6, 1), (4, 3)])
def test_the_full_data_surrogate_never_increases_and_majorises_the_objective(passes, repeats):
    """MISO: G_n(theta) = sum_b w_b [f_b(theta_b) + V(theta; S_b) - V(theta_b; S_b) + pen(theta_b)]
    majorises the penalised objective F, and G_n(theta_{n+1}) is non-increasing once every batch
    is in the table. With ``repeats = 3`` each batch is stepped 3 times in a row (what
    ``inner_steps`` does): each repetition re-anchors only that batch's term (its data is at
    hand), so the same holds after every step."""
    x, y = _data()
    model = _start(x, y)
    fs = FiniteSumMM(model, ridge=RIDGE, init="current")
    batch_size, num_rows = 50, len(x)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_rows, 50)]
    anchors, losses, values = {}, {}, []
    for _ in range(passes):
        for key, (xb, yb) in enumerate(batches):
            for _ in range(repeats):
                anchors[key] = fs.params if fs.params is not None else model.get_params()
                losses[key] = fs.step(xb, yb, key)
                if len(anchors) < len(batches):
                    continue
                values.append(_assert_surrogate_majorises(fs, model, x, y, anchors, losses))
    assert all(b <= a + 1e-10 for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]


def test_inner_steps_repeat_the_batch_step_and_count_its_samples_once():
    x, y = _data()
    repeated, plain, again = _models_at(_start(x, y).get_params(), 3)
    inner = FiniteSumMM(repeated, ridge=RIDGE, init="current", inner_steps=3)
    once = FiniteSumMM(plain, ridge=RIDGE, init="current")
    batches = [(x[i : i + 60], y[i : i + 60]) for i in range(0, len(x), 60)]
    for _ in range(2):
        for key, (xb, yb) in enumerate(batches):
            loss = inner.step(xb, yb, key)
            assert loss == once.step(xb, yb, key)
            once.step(xb, yb, key)
            once.step(xb, yb, key)
    assert _max_difference(inner.params, once.params) == 0.0
    assert inner.samples_seen == 2 * len(x) and inner.num_steps == 2 * len(batches)
    # the fit loop sees one step per batch
    history = FiniteSumMM(again, ridge=RIDGE, init="current", inner_steps=3).fit(
        x, y, batch_size=60, epochs=2, progress=False
    )
    assert len(history) == 2 * len(batches)
    assert _max_difference(again.get_params(), inner.params) == 0.0


@pytest.mark.parametrize("inner_steps", [0, -1, 1.5, True])
def test_inner_steps_must_be_a_positive_integer(inner_steps):
    x, y = _data(60)
    with pytest.raises(ValueError, match="inner_steps"):
        FiniteSumMM(_start(x, y), inner_steps=inner_steps)


def test_fit_decreases_the_full_data_nll_and_beats_one_pass():
    x, y = _data()
    model = _start(x, y)
    start = -model.log_prob(x, y).mean().item()
    fs = FiniteSumMM(model, ridge=RIDGE, init="current")
    fs.fit(x, y, batch_size=25, epochs=1, progress=False)
    one_pass = -model.log_prob(x, y).mean().item()
    fs.fit(x, y, batch_size=25, epochs=9, progress=False)
    assert len(fs.batch_statistics) == 12
    assert fs.samples_seen == 10 * len(x)
    assert -model.log_prob(x, y).mean().item() < one_pass < start


def test_checkpoint_resume_is_bit_identical():
    x, y = _data()
    params = _start(x, y).get_params()
    penalty = CoefficientPenalty(l2=RIDGE, intercept_column=None)

    def fitter():
        model = MultinomialMoE(3, 2, 3).double()
        model.set_params(tree_map(torch.clone, params))
        return FiniteSumMM(model, ridge=RIDGE, gate_penalty=penalty, init="current")

    whole = fitter()
    whole.fit(x, y, batch_size=40, epochs=3, progress=False)
    first = fitter()
    first.fit(x, y, batch_size=40, epochs=1, progress=False)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = fitter()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.fit(x, y, batch_size=40, epochs=2, progress=False)
    assert _max_difference(resumed.params, whole.params) == 0.0
    assert resumed.samples_seen == whole.samples_seen


def test_options_and_keys_are_checked():
    x, y = _data(60)
    model = _start(x, y)
    with pytest.raises(TypeError, match="schedule"):
        FiniteSumMM(model, schedule=lambda n: 0.5)
    with pytest.raises(TypeError, match="polyak_start"):
        FiniteSumMM(model, polyak_start=3)
    fs = FiniteSumMM(model, ridge=RIDGE, init="current")
    with pytest.raises(TypeError, match="key"):
        fs.step(x, y)
    with pytest.raises(ValueError, match="arrays"):
        fs.fit([(x, y)])
    # a bad batch changes nothing, its key included
    fs.step(x[:30], y[:30], 0)
    before = dict(fs.batch_statistics)
    bad = x[30:].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        fs.step(bad, y[30:], 1)
    assert fs.batch_statistics.keys() == before.keys()
    # an IncrementalMM state does not load into FiniteSumMM
    from pyro_mm import IncrementalMM

    other = IncrementalMM(_start(x, y), ridge=RIDGE, init="current")
    other.step(x, y)
    with pytest.raises(ValueError):
        fs.load_state_dict(other.state_dict())
    fs.forget_batches()
    assert fs.batch_statistics == {} and fs.statistics is None


def test_shuffled_fit_keeps_the_same_batches_at_every_pass():
    # fit(shuffle=True) splits one seeded random order into batches and keeps them: the same
    # iterates as stepping through those batches, each under its own key, pass after pass.
    x, y = _data()
    params = _start(x, y).get_params()
    fitted, stepped = _models_at(params, 2)
    FiniteSumMM(fitted, init="current", ridge=RIDGE, seed=3).fit(
        x, y, batch_size=64, epochs=3, shuffle=True, progress=False
    )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    manual = FiniteSumMM(stepped, init="current", ridge=RIDGE, seed=3)
    for _ in range(3):
        for key, start in enumerate(range(0, len(x), 64)):
            rows = order[start : start + 64]
            manual.step(x[rows], y[rows], key)
    assert _max_difference(fitted.get_params(), stepped.get_params()) == 0.0
