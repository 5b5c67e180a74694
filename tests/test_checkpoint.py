"""Checkpoint/resume: an interrupted stream resumed from a saved state gives bit-identical
parameters to the uninterrupted run."""

import pytest
import torch
from helpers import assert_trees_identical

from pyro_mm import EM, GaussianMoE, GradientEM, IncrementalMM, MirrorDescentEM, PowerDecay
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


def test_resume_through_a_file_is_bit_identical(tmp_path):
    batches = _batches(40)
    schedule = PowerDecay(0.9, 0.7)
    reference = _make(schedule=schedule, polyak_start=10)
    for x, y in batches:
        reference.step(x, y)

    interrupted = _make(schedule=PowerDecay(0.9, 0.7), polyak_start=10)
    for x, y in batches[:17]:
        interrupted.step(x, y)
    path = tmp_path / "checkpoint.pt"
    torch.save(interrupted.state_dict(), path)
    del interrupted

    # A fresh process would build the model and the inference object again: other initial
    # weights and the default schedule, both replaced by the checkpoint.
    resumed = IncrementalMM(GaussianMoE(3, 2, 2, seed=123))
    resumed.load_state_dict(torch.load(path))  # weights_only=True: plain data only
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


@pytest.mark.parametrize("method", ["EM", "MirrorDescentEM", "GradientEM"])
def test_em_type_methods_resume_bit_identically(tmp_path, method):
    def build(seed):
        model = GaussianMoE(3, 2, 2, seed=seed)
        if method == "EM":
            return EM(model, gate_max_iter=20)
        if method == "MirrorDescentEM":
            return MirrorDescentEM(model, step_size=PowerDecay(1.0, 0.7), gate_max_iter=20)
        return GradientEM(model, lr_gate=0.5, lr_experts=0.2)

    batches = _batches(8, batch_size=150)
    reference = build(9)
    for x, y in batches:
        reference.step(x, y)
    interrupted = build(9)
    for x, y in batches[:3]:
        interrupted.step(x, y)
    torch.save(interrupted.state_dict(), tmp_path / "checkpoint.pt")
    resumed = build(77)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt"))
    for x, y in batches[3:]:
        resumed.step(x, y)
    assert_trees_identical(
        _without_wall_time(resumed.state_dict()), _without_wall_time(reference.state_dict())
    )
    for name, value in reference.model.param_values().items():
        assert torch.equal(resumed.model.param_values()[name], value), name
    with pytest.raises(ValueError, match="the state does not match"):
        build(9).load_state_dict({**reference.state_dict(), "options": {"dtype": "float16"}})
