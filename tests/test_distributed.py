"""Data-parallel IncrementalMM: two gloo processes on 127.0.0.1, each stepping on its own shard
(of unequal sizes), hold the parameters of one process fed the concatenated batches."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import init_local_gloo

from pyro_mm import GaussianMoE, IncrementalMM
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.infer.distributed import all_reduce_batch, resolve_process_group
from pyro_mm.infer.state import load_tree_state
from pyro_mm.init import kmeans_init
from pyro_mm.models.params import MoEParams, tree_leaves

WORLD_SIZE = 2
NUM_STEPS = 10
BAD_STEP = 4  # rank 1's batch at this step holds a NaN


def _truth():
    return gaussian_moe_truth(3, 2, 2, seed=21)


def _shard(step: int, rank: int):
    """Rank ``rank``'s batch at ``step``: sizes differ between ranks and over time."""
    size = 40 + 7 * step if rank == 0 else 90 - 5 * step
    return sample_gaussian_moe(_truth(), size, seed=1000 * step + rank)


def _poisoned(step: int, rank: int):
    x, y = _shard(step, rank)
    if step == BAD_STEP and rank == 1:
        x = x.clone()
        x[3, 0] = float("nan")
    return x, y


def _start_params():
    truth = _truth()
    return type(truth)(
        gate=truth.gate + 0.3,
        experts=type(truth.experts)(
            weight=truth.experts.weight - 0.2, variance=truth.experts.variance * 1.5
        ),
    )


# Inputs and outputs far from zero: the iteration centres both, on all ranks' first batches.
X_SHIFT, Y_SHIFT = 20.0, 50.0


def _shifted(step: int, rank: int):
    x, y = _shard(step, rank)
    return x + X_SHIFT, y + Y_SHIFT


def _shifted_start_params():
    """The start of ``_start_params`` for the shifted data (intercepts moved accordingly)."""
    params = _start_params()
    gate, weight = params.gate.clone(), params.experts.weight.clone()
    gate[..., 0] -= X_SHIFT * gate[..., 1:].sum(-1)
    weight[..., 0] += Y_SHIFT - X_SHIFT * weight[..., 1:].sum(-1)
    return type(params)(gate=gate, experts=type(params.experts)(weight, params.experts.variance))


def _model(init_params=None):
    model = GaussianMoE(3, 2, 2, seed=4).double()
    if init_params is not None:
        model.set_params(init_params)
    return model


def _worker(rank: int, out_dir: str) -> None:
    init_local_gloo(rank, os.path.join(out_dir, "store"), WORLD_SIZE)
    try:
        results = {}
        # 1. A given start (init="current"), Polyak averaging, the default process group.
        infer = IncrementalMM(_model(_start_params()), init="current", polyak_start=4)
        results["losses"] = [infer.step(*_shard(step, rank)) for step in range(NUM_STEPS)]
        results["current"] = infer.state_dict()

        # 2. K-means on the first rank's first batch, broadcast; a bad batch on rank 1 makes
        #    both ranks raise before any change, and the stream goes on.
        infer = IncrementalMM(_model(), process_group=dist.group.WORLD)
        errors = []
        for step in range(NUM_STEPS):
            before = load_tree_state(infer.state_dict())
            try:
                infer.step(*_poisoned(step, rank))
            except ValueError as err:
                errors.append(str(err))
                after = load_tree_state(infer.state_dict())
                for name in ("params", "statistics"):
                    assert _max_difference(before[name], after[name]) == 0
                assert after["num_steps"] == before["num_steps"] == step
        results["errors"] = errors
        results["kmeans"] = infer.state_dict()

        # 3. The skip policy skips on every rank together.
        infer = IncrementalMM(_model(_start_params()), init="current", on_bad_batch="skip")
        for step in range(NUM_STEPS):
            infer.step(*_poisoned(step, rank))
        results["skip"] = infer.state_dict()

        # 4. Unequal per-rank averages are weighted by their row counts.
        infer = IncrementalMM(
            _model(_shifted_start_params()),
            init="current",
            process_group=dist.group.WORLD,
            centre_regressors=True,
        )
        for step in range(NUM_STEPS):
            infer.step(*_shifted(step, rank))
        results["centred"] = infer.state_dict()

        local = torch.full((2,), float(rank + 1), dtype=torch.float64)
        reduced = all_reduce_batch(
            dist.group.WORLD, MoEParams(gate=local, experts=None), None, -float(rank + 1), rank + 1
        )
        results["weighted"] = (reduced.statistics.gate, reduced.num_rows, reduced.log_lik_sum)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _concatenated(step: int, batches=_shard):
    parts = [batches(step, rank) for rank in range(WORLD_SIZE)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _max_difference(left, right) -> float:
    pairs = list(zip(tree_leaves(left), tree_leaves(right), strict=True))
    return max(float((a - b).abs().max()) for a, b in pairs)


def _assert_same_fit(distributed: dict, single: IncrementalMM) -> None:
    distributed = load_tree_state(distributed)
    expected = load_tree_state(single.state_dict())
    for name in ("params", "statistics", "averaged_params"):
        if expected[name] is None:
            assert distributed[name] is None
            continue
        difference = _max_difference(distributed[name], expected[name])
        assert difference < 1e-10, (name, difference)
    for name in ("num_steps", "samples_seen", "regularisation"):
        assert distributed[name] == expected[name], name
    losses = torch.tensor(distributed["history"]["loss"])
    assert torch.allclose(losses, torch.tensor(expected["history"]["loss"]), rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_ranks_match_one_process_fed_the_concatenated_batches(rank_results):
    single = IncrementalMM(_model(_start_params()), init="current", polyak_start=4)
    losses = [single.step(*_concatenated(step)) for step in range(NUM_STEPS)]
    for result in rank_results:
        assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), atol=1e-10)
        _assert_same_fit(result["current"], single)
        # All ranks hold bitwise the same parameters.
        params = [load_tree_state(r["current"]["params"]) for r in (result, rank_results[0])]
        assert _max_difference(*params) == 0


def test_kmeans_start_comes_from_the_first_rank_and_bad_batches_stop_every_rank(rank_results):
    x0, y0 = _shard(0, 0)
    model = _model()
    reference = IncrementalMM(model, init="current")
    model.set_params(
        kmeans_init(model, x0, y0, seed=0, expert_surrogate=reference.expert_surrogate)
    )
    for step in range(NUM_STEPS):
        if step != BAD_STEP:
            reference.step(*_concatenated(step))
    for result in rank_results:
        _assert_same_fit(result["kmeans"], reference)
    [own_error] = rank_results[1]["errors"]
    [other_error] = rank_results[0]["errors"]
    assert "NaN" in own_error and "row(s) [3]" in own_error
    assert "1 other rank(s) rejected their batch" in other_error


def test_skip_policy_skips_on_every_rank(rank_results):
    reference = IncrementalMM(_model(_start_params()), init="current")
    for step in range(NUM_STEPS):
        if step != BAD_STEP:
            reference.step(*_concatenated(step))
    for result in rank_results:
        state = result["skip"]
        assert state["regularisation"]["skipped_batches"] == 1
        state["regularisation"]["skipped_batches"] = 0
        _assert_same_fit(state, reference)


def test_ranks_centre_inputs_and_outputs_on_every_ranks_first_batch(rank_results):
    single = IncrementalMM(_model(_shifted_start_params()), init="current", centre_regressors=True)
    for step in range(NUM_STEPS):
        single.step(*_concatenated(step, _shifted))
    assert float(single.centring.outputs.min()) > Y_SHIFT - 10
    for result in rank_results:
        _assert_same_fit(result["centred"], single)
        centring = load_tree_state(result["centred"]["centring"])
        # Means all-reduced over the ranks' batches: equal up to the order of the sums.
        assert torch.allclose(centring.outputs, single.centring.outputs, rtol=0, atol=1e-12)


def test_averages_are_weighted_by_row_counts(rank_results):
    for result in rank_results:
        averaged, rows, log_lik_sum = result["weighted"]
        # rank 0: one row averaging 1; rank 1: two rows averaging 2 -> (1 + 4) / 3.
        assert torch.equal(averaged, torch.full((2,), 5 / 3, dtype=torch.float64))
        assert rows == 3 and log_lik_sum == -3.0


def test_single_process_resolution():
    assert resolve_process_group(False) is None
    if not dist.is_initialized():
        assert resolve_process_group(None) is None
