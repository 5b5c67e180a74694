"""How fast the main case's IncrementalMM step can be in eager PyTorch: the same update with
nothing around it, against the library's step and Pyro SVI in the same run.

The throughput goal of 5x Pyro SVI's samples/s at K=2, P=10, batch 4096, float64
(``throughput.py``) has not been met by the library's step. This script asks whether it can be
met by removing overhead, or whether the operations the update needs are the bound.
:func:`reference_step` is the update of ``IncrementalMM`` with default options on this case
(Böhning gate bound, ``gate_eps`` 1e-6, ridge 1e-8 off the intercept, variance floor 1e-6,
``PowerDecay(1.0, 0.6)``), written as the fewest eager torch operations we found, and without
what the library does besides: no input validation, no finiteness checks, no regularisation
counters, no centring, no writing into the Pyro model, the statistics lerped in place in two
tensors. Before any timing the script checks that it reproduces the library's iterates from
the same state (to 1e-12 after 5 steps), so both time the same algorithm.

Timed in ``--rounds`` (default 5) alternating rounds, each method over one pass of the same
10^6 rows (``throughput.make_data``, batch 4096, the first step excluded; one torch thread): the
wall, median-step and fastest-step samples/s, as ``throughput.py``. Writes
``benchmarks/results/step_floor.{json,md}``.

Run: ``python benchmarks/step_floor.py`` (about 20 seconds).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import RESULTS, _timed_pass, make_data, svi_pass  # noqa: E402

from pyro_mm import GaussianMoE, IncrementalMM  # noqa: E402

NUM_EXPERTS, IN_FEATURES, BATCH = 2, 10, 4096
NUM_FEATURES = IN_FEATURES + 1
_LOG_2PI = math.log(2 * math.pi)
#: Böhning's curvature bound for two experts, ``gate_eps``, ridge and variance floor: the
#: library's defaults, which the check against IncrementalMM confirms.
_CURVATURE, _GATE_EPS, _RIDGE, _FLOOR = 0.25, 1e-6, 1e-8, 1e-6


def state_from(infer: IncrementalMM) -> dict:
    """The reference step's state from an initialised ``IncrementalMM`` (uncentred): the
    iterate and the running statistics, the experts' as the ``(K, D + 1, D + 1)`` moment
    matrices of ``z = (r(x), y)``."""
    assert infer.centring is None, "the reference step runs uncentred"
    params, stats = infer._iterate, infer.statistics
    moments = torch.zeros(NUM_EXPERTS, NUM_FEATURES + 1, NUM_FEATURES + 1, dtype=torch.float64)
    moments[:, :NUM_FEATURES, :NUM_FEATURES] = stats.experts.gram
    moments[:, NUM_FEATURES:, :NUM_FEATURES] = stats.experts.cross
    moments[:, :NUM_FEATURES, NUM_FEATURES:] = stats.experts.cross.mT
    moments[:, NUM_FEATURES, NUM_FEATURES] = stats.experts.square[:, 0]
    ridge_mask = torch.ones(NUM_FEATURES, dtype=torch.float64)
    ridge_mask[0] = 0.0  # the intercept's coefficient is not penalised
    return {
        "gate": params.gate.clone(),
        "weight": params.experts.weight.reshape(NUM_EXPERTS, NUM_FEATURES).clone(),
        "variance": params.experts.variance.clone(),
        "moments": moments,
        "gate_linear": stats.gate.linear.clone(),
        "ridge_mask": ridge_mask,
        "ones": torch.ones(1, BATCH, dtype=torch.float64),
    }


def reference_step(state: dict, x: torch.Tensor, y: torch.Tensor, gamma: float) -> float:
    """One incremental MM step of the main case on a batch of at most ``BATCH`` rows, in place
    on ``state``; returns the batch's mean NLL (see the module docstring for what it leaves
    out)."""
    num_rows = x.shape[0]
    # (D + 1, N): r(x) and y, feature-major
    design = torch.cat([state["ones"][:, :num_rows], x.T, y.T])
    features = design[:NUM_FEATURES]
    gate, variance = state["gate"], state["variance"]
    linear = torch.cat([gate, state["weight"]]) @ features  # gate logit, then expert means
    free_logit = linear[0]
    residual = design[NUM_FEATURES:] - linear[1:]
    log_joint = torch.addcmul(
        -0.5 * (_LOG_2PI + variance.log()), residual.square_(), -0.5 / variance
    )
    log_joint[0] += free_logit
    top = log_joint.amax(0)
    joint = (log_joint - top).exp_()
    total = joint.sum(0)
    resp = joint.div_(total)
    log_lik = total.log_().add_(top).sub_(F.softplus(free_logit, threshold=40.0))
    gate_residual = resp[0] - torch.sigmoid(free_logit)
    moments = ((resp.unsqueeze(1) * design) @ design.T).div_(num_rows)
    gram = moments[:, :NUM_FEATURES, :NUM_FEATURES].sum(0)
    gate_linear = (
        (gate_residual @ features.T)
        .div_(num_rows)
        .add_(gate[0] @ gram, alpha=_CURVATURE)
        .add_(gate[0], alpha=_GATE_EPS)
    )
    loss = -log_lik.sum().item() / num_rows
    torch._foreach_lerp_(
        [state["moments"], state["gate_linear"]], [moments, gate_linear.unsqueeze(0)], gamma
    )
    running = state["moments"]
    gate_system = running[:, :NUM_FEATURES, :NUM_FEATURES].sum(0).mul_(_CURVATURE)
    gate_system.diagonal().add_(_GATE_EPS)
    state["gate"] = torch.cholesky_solve(
        state["gate_linear"].T, torch.linalg.cholesky(gate_system)
    ).T
    mass = running[:, 0, 0]
    expert_system = running[:, :NUM_FEATURES, :NUM_FEATURES] + torch.diag_embed(
        (_RIDGE * mass)[:, None] * state["ridge_mask"]
    )
    cross = running[:, NUM_FEATURES:, :NUM_FEATURES]
    weight = torch.cholesky_solve(cross.mT, torch.linalg.cholesky(expert_system)).mT
    square = running[:, NUM_FEATURES:, NUM_FEATURES:].diagonal(dim1=-2, dim2=-1)
    state["variance"] = ((square - (weight * cross).sum(-1)) / mass[:, None]).clamp_min_(_FLOOR)
    state["weight"] = weight.reshape(NUM_EXPERTS, NUM_FEATURES)
    return loss


def check_reference(x, y, steps: int = 5) -> float:
    """The largest difference between the reference step's iterates and IncrementalMM's
    after ``steps`` steps from the same state (raises above 1e-12)."""
    infer = IncrementalMM(GaussianMoE(NUM_EXPERTS, IN_FEATURES))
    infer.step(x[:BATCH], y[:BATCH])
    state = state_from(infer)
    for index in range(1, steps + 1):
        gamma = float(infer.schedule(infer.num_steps + 1))
        rows = slice(index * BATCH, (index + 1) * BATCH)
        infer.step(x[rows], y[rows])
        reference_step(state, x[rows], y[rows], gamma)
    params = infer._iterate
    difference = max(
        float((state["gate"] - params.gate).abs().max()),
        float((state["weight"] - params.experts.weight.reshape(state["weight"].shape)).abs().max()),
        float((state["variance"] - params.experts.variance).abs().max()),
    )
    if not difference < 1e-12:
        raise AssertionError(f"the reference step differs from IncrementalMM by {difference:.2e}")
    return difference


def reference_pass(x, y):
    """Samples/s of the reference step over the batches of ``(x, y)`` (``_timed_pass``),
    initialised by IncrementalMM on the first batch (excluded from the timing, as there)."""
    infer = IncrementalMM(GaussianMoE(NUM_EXPERTS, IN_FEATURES))
    schedule = infer.schedule
    state, steps = None, [0]

    def step(xb, yb):
        nonlocal state
        if state is None:
            infer.step(xb, yb)
            state = state_from(infer)
            return
        steps[0] += 1
        reference_step(state, xb, yb, float(schedule(steps[0] + 1)))

    return _timed_pass(step, x, y, BATCH, None)


def library_pass(x, y):
    infer = IncrementalMM(GaussianMoE(NUM_EXPERTS, IN_FEATURES))
    return _timed_pass(infer.step, x, y, BATCH, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10**6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x, y = make_data(NUM_EXPERTS, IN_FEATURES, args.rows)
    difference = check_reference(x, y)
    rounds = []
    for _ in range(args.rounds):
        rounds.append(
            {
                "library": library_pass(x, y),
                "reference": reference_pass(x, y),
                "svi": svi_pass(NUM_EXPERTS, x, y, BATCH),
            }
        )
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"1 torch thread",
        "load_average_at_end": os.getloadavg(),
        "rows": args.rows,
        "reference_vs_library_max_difference": difference,
        "rounds": rounds,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "step_floor.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(RESULTS, "step_floor.md"), "w") as f:
        f.write(render(report))
    print(render(report))


def render(report) -> str:
    names = {"library": "IncrementalMM.step", "reference": "reference step", "svi": "Pyro SVI"}
    lines = [
        "# The main case's step with nothing around it (eager PyTorch)",
        "",
        f"Command: `{report['command']}`; {report['machine']}; load average at the end "
        f"{tuple(round(v, 2) for v in report['load_average_at_end'])}. K = 2, P = 10, batch "
        f"4096, float64, {report['rows']:.0e} rows per pass; the reference step reproduces "
        f"IncrementalMM's iterates to {report['reference_vs_library_max_difference']:.1e} "
        "after 5 steps (checked before timing).",
        "",
        "| round | method | wall samples/s | median step | fastest step | wall / SVI |",
        "|---|---|---|---|---|---|",
    ]
    for index, rnd in enumerate(report["rounds"], 1):
        for key in ("library", "reference", "svi"):
            rate = rnd[key]
            lines.append(
                f"| {index} | {names[key]} | {rate['wall']:,.0f} | {rate['median_step']:,.0f} | "
                f"{rate['fastest_step']:,.0f} | {rate['wall'] / rnd['svi']['wall']:.2f}x |"
            )
    medians = {
        key: statistics.median(rnd[key]["wall"] for rnd in report["rounds"])
        for key in ("library", "reference", "svi")
    }
    lines += [
        "",
        f"Medians over the rounds of the wall rates: IncrementalMM.step "
        f"{medians['library']:,.0f}, reference step {medians['reference']:,.0f}, Pyro SVI "
        f"{medians['svi']:,.0f} samples/s; ratios to SVI "
        f"{medians['library'] / medians['svi']:.2f}x and "
        f"{medians['reference'] / medians['svi']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
