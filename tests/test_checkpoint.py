"""Checkpoint/resume: an interrupted stream resumed from a saved state gives bit-identical
parameters to the uninterrupted run (IncrementalMM, the EM family and SVIFit)."""

import copy

import pyro
import pyro.optim
import pytest
import torch
from helpers import assert_trees_identical
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pytorch_optimizer import SophiaH

from pyro_mm import (
    EM,
    FiniteSumMM,
    GaussianMoE,
    GradientEM,
    IncrementalMM,
    MirrorDescentEM,
    MoEPriors,
    PowerDecay,
    SVIFit,
)
from pyro_mm.datasets import gaussian_moe_stream, gaussian_moe_truth
from pyro_mm.infer.state import load_tree_state, tree_state, tree_unflatten
from pyro_mm.models.params import tree_leaves


def _batches(num_batches, batch_size=64, seed=5):
    truth = gaussian_moe_truth(3, 2, 2, seed=1)
    return list(gaussian_moe_stream(truth, batch_size, num_batches, seed=seed))


def _make(**options):
    return IncrementalMM(GaussianMoE(3, 2, 2, seed=9), **options)


def _without_wall_time(state):
    return {**state, "history": {**state["history"], "wall_time": None}}


def _interrupt_and_resume(build, batches, stop, path, *, build_resumed=None, clear_store=False):
    """``(reference, resumed)``: ``build(9)`` stepped over all ``batches``, and the state of
    another ``build(9)`` stopped after ``stop`` batches, saved to ``path`` with ``torch.save``,
    loaded into a fresh object (``build_resumed()``, default ``build(123)``: other initial
    weights, as a new process would build it) and stepped over the rest. ``clear_store``
    empties Pyro's param store before each fit (SVIFit keeps its parameters there)."""
    if clear_store:
        pyro.clear_param_store()
    reference = build(9)
    for x, y in batches:
        reference.step(x, y)
    interrupted = build(9)
    for x, y in batches[:stop]:
        interrupted.step(x, y)
    torch.save(interrupted.state_dict(), path)
    del interrupted

    if clear_store:
        pyro.clear_param_store()
    resumed = build(123) if build_resumed is None else build_resumed()
    resumed.load_state_dict(torch.load(path))  # weights_only=True: plain data only
    assert resumed.num_steps == stop
    assert resumed.samples_seen == sum(x.shape[0] for x, _ in batches[:stop])
    return reference, resumed


def test_resume_through_a_file_is_bit_identical(tmp_path):
    batches = _batches(40)
    reference, resumed = _interrupt_and_resume(
        lambda seed: _make(schedule=PowerDecay(0.9, 0.7), polyak_start=10),
        batches,
        17,
        tmp_path / "checkpoint.pt",
        # The default schedule and other initial weights, both replaced by the checkpoint.
        build_resumed=lambda: IncrementalMM(GaussianMoE(3, 2, 2, seed=123)),
    )
    assert isinstance(resumed.schedule, PowerDecay) and resumed.schedule.alpha == 0.7
    assert resumed.polyak_start == 10
    for x, y in batches[17:]:
        resumed.step(x, y)

    assert_trees_identical(
        _without_wall_time(resumed.state_dict()), _without_wall_time(reference.state_dict())
    )
    assert resumed.history.loss == reference.history.loss
    for name, value in reference.model.param_values().items():
        assert torch.equal(resumed.model.param_values()[name], value), name


def test_state_dict_is_a_snapshot_and_loading_it_rewinds():
    batches = _batches(12)
    infer = _make(polyak_start=3)
    for x, y in batches[:6]:
        infer.step(x, y)
    snapshot = infer.state_dict()
    frozen = tree_state(snapshot)
    later = [infer.step(x, y) for x, y in batches[6:]]
    assert_trees_identical(snapshot, frozen)  # later steps did not write into the snapshot

    infer.load_state_dict(snapshot)
    assert infer.num_steps == 6 and torch.equal(infer.model.get_params().gate, infer.estimate.gate)
    replayed = [infer.step(x, y) for x, y in batches[6:]]
    assert replayed == later


def test_state_before_initialisation_round_trips():
    batches = _batches(1)
    fresh = _make()
    state = fresh.state_dict()
    assert state["params"] is None and state["statistics"] is None
    other = _make()
    other.load_state_dict(state)
    assert other.params is None
    for infer in (fresh, other):
        infer.step(*batches[0])
    assert torch.equal(fresh.params.gate, other.params.gate)


def test_loading_into_a_differently_built_object_fails_before_any_change():
    batches = _batches(4)
    infer = _make()
    for x, y in batches:
        infer.step(x, y)
    state = infer.state_dict()

    other = _make(ridge=1e-4)
    other.step(*batches[0])
    before = tree_state(other.state_dict())
    with pytest.raises(ValueError, match="ridge=1e-08 in the state but 0.0001 here"):
        other.load_state_dict(state)
    assert_trees_identical(tree_state(other.state_dict()), before)

    with pytest.raises(ValueError, match="dtype"):
        IncrementalMM(GaussianMoE(3, 2, 2), dtype=torch.float32).load_state_dict(state)
    wider = IncrementalMM(GaussianMoE(3, 3, 2))
    with pytest.raises(ValueError, match="params.gate has shape"):
        wider.load_state_dict(state)
    assert wider.params is None


def test_a_state_without_centring_goes_on_in_the_models_coordinates():
    """States saved before the iteration centred its regressors have no ``centring`` entry:
    they load, and the fit goes on in the model's own coordinates exactly as the uncentred
    iteration does; a centred state keeps its centre (the same steps, bit for bit)."""
    batches = _batches(6)
    uncentred = _make(centre_regressors=False)
    for x, y in batches[:3]:
        uncentred.step(x, y)
    old_state = uncentred.state_dict()
    assert old_state["centring"] is None
    del old_state["centring"]
    resumed = _make(centre_regressors=True)  # the state decides the coordinates
    resumed.load_state_dict(old_state)
    assert resumed.centring is None
    for x, y in batches[3:]:
        uncentred.step(x, y)
        resumed.step(x, y)
    assert_trees_identical(tree_state(resumed.params), tree_state(uncentred.params))

    centred = _make(centre_regressors=True)  # standardised data: "auto" would not centre
    for x, y in batches[:3]:
        centred.step(x, y)
    state = centred.state_dict()
    assert torch.equal(state["centring"]["experts"], centred.centring.experts)
    again = _make(centre_regressors=False)
    again.load_state_dict(state)
    for x, y in batches[3:]:
        centred.step(x, y)
        again.step(x, y)
    assert_trees_identical(tree_state(again.params), tree_state(centred.params))


def test_a_centred_state_saved_before_outputs_were_centred_goes_on_as_it_was(monkeypatch):
    """A centred state from before outputs were centred has no ``outputs`` in its centring: its
    iterate and statistics have the outputs uncentred, and it goes on so, bit for bit."""
    import pyro_mm.infer.incremental_mm as incremental_mm

    batches = [(x, y + 50.0) for x, y in _batches(6)]
    real_centring = incremental_mm.centring_from_moments

    def regressors_only(moments, model, always=False):
        centring = real_centring(moments, model, always)
        centring.outputs = torch.zeros_like(centring.outputs)
        return centring

    monkeypatch.setattr(incremental_mm, "centring_from_moments", regressors_only)
    old = _make(centre_regressors=True)
    for x, y in batches[:3]:
        old.step(x, y)
    monkeypatch.undo()
    state = old.state_dict()
    del state["centring"]["outputs"]
    resumed = _make()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.centring.outputs, torch.zeros(2, dtype=torch.float64))
    for x, y in batches[3:]:
        old.step(x, y)
        resumed.step(x, y)
    assert_trees_identical(tree_state(resumed.params), tree_state(old.params))
    # A state of today's code centres the outputs (here on about 50).
    today = _make(centre_regressors=True)
    today.step(*batches[0])
    assert bool((today.centring.outputs - 50.0).abs().max() < 5.0)


def test_a_function_schedule_is_not_stored_and_the_constructors_is_kept():
    def schedule(n):
        return 0.5

    infer = _make(schedule=schedule)
    state = infer.state_dict()
    assert state["schedule"] is None
    other = _make(schedule=schedule)
    other.load_state_dict(state)
    assert other.schedule is schedule


def test_tree_helpers_round_trip_and_refuse_unknown_classes():
    batches = _batches(1)
    infer = _make()
    infer.step(*batches[0])
    stored = tree_state(infer.statistics)
    assert_trees_identical(load_tree_state(stored), infer.statistics)
    leaves = tree_leaves(infer.params)
    assert_trees_identical(tree_unflatten(infer.params, leaves), infer.params)
    stored["__dataclass__"] = "some_module_never_imported:Statistics"
    with pytest.raises(ValueError, match="no imported module defines"):
        load_tree_state(stored)


@pytest.mark.parametrize("shift", [0.0, 100.0])
@pytest.mark.parametrize("method", ["EM", "MirrorDescentEM", "GradientEM"])
def test_em_type_methods_resume_bit_identically(tmp_path, method, shift):
    """Also on inputs shifted by 100, which EM and MirrorDescentEM run centred: the state
    carries the centring with the centred iterate."""

    def build(seed):
        model = GaussianMoE(3, 2, 2, seed=seed)
        if method == "EM":
            return EM(model, gate_max_iter=20)
        if method == "MirrorDescentEM":
            return MirrorDescentEM(model, step_size=PowerDecay(1.0, 0.7), gate_max_iter=20)
        return GradientEM(model, lr_gate=0.5, lr_experts=0.2)

    batches = [(x + shift, y) for x, y in _batches(8, batch_size=150)]
    reference, resumed = _interrupt_and_resume(build, batches, 3, tmp_path / "checkpoint.pt")
    assert (reference.centring is not None) == (shift > 0 and method != "GradientEM")
    for x, y in batches[3:]:
        resumed.step(x, y)
    assert_trees_identical(
        _without_wall_time(resumed.state_dict()), _without_wall_time(reference.state_dict())
    )
    for name, value in reference.model.param_values().items():
        assert torch.equal(resumed.model.param_values()[name], value), name
    with pytest.raises(ValueError, match="the state does not match"):
        build(9).load_state_dict({**reference.state_dict(), "options": {"dtype": "float16"}})


# --------------------------------------------------------------------------------- SVIFit
def _svi_builders():
    num_data = 64 * 12
    return {
        "ML-pyro-Adam": lambda seed: SVIFit(
            GaussianMoE(3, 2, 2, seed=seed), optim=pyro.optim.Adam({"lr": 0.02}), num_data=num_data
        ),
        "AutoNormal-pyro-ClippedAdam": lambda seed: SVIFit(
            GaussianMoE(3, 2, 2, seed=seed, priors=MoEPriors()),
            AutoNormal,
            pyro.optim.ClippedAdam({"lr": 0.02}),
            guide_args={"init_scale": 0.05},
            num_data=num_data,
        ),
        "AutoNormal-torch-Adam": lambda seed: SVIFit(
            GaussianMoE(3, 2, 2, seed=seed, priors=MoEPriors()),
            AutoNormal,
            torch.optim.Adam,
            optim_args={"lr": 0.02},
            num_data=num_data,
        ),
        # SophiaH draws the noise of its Hessian estimates from the fit's random state.
        "ML-torch-SophiaH": lambda seed: SVIFit(
            GaussianMoE(3, 2, 2, seed=seed),
            optim=SophiaH,
            optim_args={"lr": 0.02, "update_period": 1},
            num_data=num_data,
        ),
    }


def _assert_same_fit(left, right):
    for name, value in left.model.param_values().items():
        assert torch.equal(right.model.param_values()[name], value), name
    assert_trees_identical(
        _without_wall_time(right.state_dict()), _without_wall_time(left.state_dict())
    )


@pytest.mark.parametrize("method", list(_svi_builders()))
def test_svi_fit_resumes_bit_identically(tmp_path, method):
    build = _svi_builders()[method]
    batches = _batches(12)
    reference, resumed = _interrupt_and_resume(
        build, batches, 5, tmp_path / "checkpoint.pt", clear_store=True
    )
    for x, y in batches[5:]:
        resumed.step(x, y)
    _assert_same_fit(reference, resumed)
    assert resumed.history.loss == reference.history.loss
    assert resumed.last_objective == reference.last_objective


def test_svi_fit_checkpoint_holds_the_random_state_of_the_guides_draws(tmp_path):
    build = _svi_builders()["AutoNormal-torch-Adam"]
    batches = _batches(8)
    interrupted = build(9)
    for x, y in batches[:3]:
        interrupted.step(x, y)
    state = interrupted.state_dict()
    runs = []
    for rng_state in (state["rng_state"], torch.Generator().manual_seed(1).get_state()):
        pyro.clear_param_store()
        resumed = build(9)
        resumed.load_state_dict({**state, "rng_state": rng_state})
        for x, y in batches[3:]:
            resumed.step(x, y)
        runs.append(resumed.model.param_values())
    # Another random state gives other ELBO draws, so the stored one is what makes the resume exact.
    assert not all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])


@pytest.mark.parametrize("method", ["ML-pyro-Adam", "AutoNormal-torch-Adam"])
def test_svi_fit_state_dict_is_a_snapshot_and_loading_it_rewinds(method):
    build = _svi_builders()[method]
    batches = _batches(10)
    fit = build(9)
    for x, y in batches[:4]:
        fit.step(x, y)
    snapshot = fit.state_dict()
    frozen = copy.deepcopy(snapshot)
    later = [fit.step(x, y) for x, y in batches[4:]]
    after = fit.model.param_values()
    assert_trees_identical(snapshot, frozen)  # later steps did not write into the snapshot

    fit.load_state_dict(snapshot)
    assert fit.num_steps == 4
    assert_trees_identical(fit.state_dict(), frozen)  # loaded, not yet applied: same state
    replayed = [fit.step(x, y) for x, y in batches[4:]]
    assert replayed == later
    for name, value in after.items():
        assert torch.equal(fit.model.param_values()[name], value), name


def test_svi_fit_state_before_initialisation_round_trips():
    build = _svi_builders()["AutoNormal-pyro-ClippedAdam"]
    batches = _batches(3)
    fresh = build(9)
    state = fresh.state_dict()
    assert not state["initialized"] and state["param_store"] is None
    other = build(123)
    other.load_state_dict(state)
    for fit in (fresh, other):
        for x, y in batches:
            fit.step(x, y)
    _assert_same_fit(fresh, other)


def test_svi_fit_loading_into_a_differently_built_fit_fails_before_any_change():
    builders = _svi_builders()
    batches = _batches(3)
    fit = builders["ML-pyro-Adam"](9)
    for x, y in batches:
        fit.step(x, y)
    state = fit.state_dict()

    other = builders["ML-torch-SophiaH"](9)
    other.step(*batches[0])
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"optim='pyro\.optim\.optim\.PyroOptim\(torch\.optim"):
        other.load_state_dict(state)
    assert_trees_identical(other.state_dict(), before)

    with pytest.raises(ValueError, match="guide=None in the state but 'pyro.infer.autoguide"):
        SVIFit(
            GaussianMoE(3, 2, 2, priors=MoEPriors()),
            AutoDelta,
            pyro.optim.Adam({"lr": 0.02}),
            num_data=64 * 12,
        ).load_state_dict(state)
    wider = SVIFit(GaussianMoE(3, 3, 2), optim=pyro.optim.Adam({"lr": 0.02}), num_data=64 * 12)
    with pytest.raises(ValueError, match="gate_weight_unconstrained has shape"):
        wider.load_state_dict(state)
    assert wider.num_steps == 0 and not wider.model.fitted


_CORRUPTIBLE = {  # a fit, and the part of its state that gets a NaN
    "IncrementalMM": (lambda: _make(polyak_start=1), "averaged_params"),
    "FiniteSumMM": (lambda: FiniteSumMM(GaussianMoE(3, 2, 2, seed=9)), "statistics"),
    "EM": (lambda: EM(GaussianMoE(3, 2, 2, seed=9)), "params"),
    "SVIFit": (lambda: SVIFit(GaussianMoE(3, 2, 2, seed=9), seed=0), "model"),
}


@pytest.mark.parametrize("method", sorted(_CORRUPTIBLE))
def test_a_checkpoint_holding_nan_is_refused_before_any_change(method):
    # Loaded silently, a NaN Polyak average went straight into the model's estimate, and a NaN
    # iterate failed the next step blaming the batch.
    build, group = _CORRUPTIBLE[method]
    batches = _batches(3)
    source = build()
    for index, (x, y) in enumerate(batches):
        source.step(x, y, index) if method == "FiniteSumMM" else source.step(x, y)
    state = copy.deepcopy(source.state_dict())
    leaf = next(
        (path, tensor)
        for path, tensor in _floating_leaves(state[group], group)
        if tensor.numel() > 1
    )
    leaf[1].view(-1)[1] = float("nan")
    target = build()
    target.step(*batches[0], 0) if method == "FiniteSumMM" else target.step(*batches[0])
    before = tree_state(target.state_dict())
    with pytest.raises(ValueError, match=rf"non-finite values in {leaf[0]}: a corrupted"):
        target.load_state_dict(state)
    assert_trees_identical(tree_state(target.state_dict()), before)


def _floating_leaves(state, path):
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            yield path, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from _floating_leaves(value, f"{path}.{key}")
