"""The gate's curvature bounds compared: Böhning's, the paper's, and (K = 2) Jaakkola-Jordan's.

Data (written down exactly), for each ``K`` in ``--experts`` (default 2, 3, 5, 8):
``truth = gaussian_moe_truth(K, in_features=5, out_features=1, gate_norm=3.0, noise_std=0.5,
seed=K)``; training set ``sample_gaussian_moe(truth, --num-train, seed=100 + K)``, held-out set
``sample_gaussian_moe(truth, --num-test, seed=200 + K)``, stream ``gaussian_moe_stream(truth,
--stream-batch, seed=300 + K)``.

(a) **Batch MM** (``batch_mm``: gamma = 1, the whole training set at every iteration) from one
    common start (K-means on the training set, seed 0), for each bound, until the NLL changes by
    less than 1e-13 or ``--max-iter`` iterations. ``L*`` = the lowest training NLL any bound
    reached. Reported: iterations and seconds until ``NLL - L* <= tol`` for tol in 1e-3, 1e-6.
(b) **Incremental MM** on a stream (``IncrementalMM`` defaults: gamma_n = n^-0.6, K-means on the
    first batch, batch ``--stream-batch``), one pass over ``--stream-batches`` batches per seed
    in ``--seeds``. Reported: samples and training seconds until the held-out NLL is within
    ``--stream-tol`` of the held-out NLL at the batch optimum of (a), and the gap at the end
    (medians over stream seeds). Held-out evaluation is excluded from the timings.

Run: ``python benchmarks/bounds.py`` (writes ``benchmarks/results/bounds.{json,md,png}``).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from pyro_mm import GaussianMoE, IncrementalMM
from pyro_mm.datasets import gaussian_moe_stream, gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.infer.em import batch_mm
from pyro_mm.init import kmeans_init

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOLERANCES = (1e-3, 1e-6)
IN_FEATURES = 5


def bounds_for(num_experts):
    return ("bohning", "paper", "jaakkola-jordan") if num_experts == 2 else ("bohning", "paper")


def heldout_nll(model, x, y):
    with torch.no_grad():
        return -model.log_prob(x, y).mean().item()


def batch_run(bound, start, x, y, max_iter):
    """Batch MM from ``start``; returns the training NLL per iteration and cumulative seconds."""
    model = GaussianMoE(len(start.experts.weight), IN_FEATURES).double()
    model.set_params(start)
    mm = batch_mm(model, gate_bound=bound, init="current")
    losses, seconds, elapsed = [], [], 0.0
    for _ in range(max_iter + 1):
        begin = time.perf_counter()
        # step(x, y) returns the NLL at the parameters it was given: iteration t's NLL comes
        # back from step t + 1, so the last step's own time is not counted.
        loss = mm.step(x, y)
        losses.append(loss)
        seconds.append(elapsed)
        elapsed += time.perf_counter() - begin
        if len(losses) > 1 and abs(losses[-2] - loss) < 1e-13:
            break
    return {"losses": losses, "seconds": seconds, "params": mm.params}


def first_within(values, target, tol):
    for index, value in enumerate(values):
        if value - target <= tol:
            return index
    return None


def stream_run(bound, truth, num_experts, args, seed, x_test, y_test, target_nll):
    model = GaussianMoE(num_experts, IN_FEATURES)
    infer = IncrementalMM(model, gate_bound=bound)
    stream = gaussian_moe_stream(truth, args.stream_batch, args.stream_batches, seed=seed)
    elapsed, reached, curve = 0.0, None, []
    for step, (x, y) in enumerate(stream, start=1):
        begin = time.perf_counter()
        infer.step(x, y)
        elapsed += time.perf_counter() - begin
        if step % args.eval_every == 0 or step == args.stream_batches:
            gap = heldout_nll(model, x_test, y_test) - target_nll
            curve.append((infer.samples_seen, elapsed, gap))
            if reached is None and gap <= args.stream_tol:
                reached = (infer.samples_seen, elapsed)
    return {"reached": reached, "final_gap": curve[-1][2], "curve": curve}


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def compare(num_experts, args):
    truth = gaussian_moe_truth(
        num_experts, IN_FEATURES, 1, gate_norm=3.0, noise_std=0.5, seed=num_experts
    )
    x, y = sample_gaussian_moe(truth, args.num_train, seed=100 + num_experts)
    x_test, y_test = sample_gaussian_moe(truth, args.num_test, seed=200 + num_experts)
    template = GaussianMoE(num_experts, IN_FEATURES).double()
    start = kmeans_init(template, x, y, seed=0)
    runs = {
        bound: batch_run(bound, start, x, y, args.max_iter) for bound in bounds_for(num_experts)
    }
    best_bound = min(runs, key=lambda b: runs[b]["losses"][-1])
    optimum = runs[best_bound]["losses"][-1]
    best_model = GaussianMoE(num_experts, IN_FEATURES).double()
    best_model.set_params(runs[best_bound]["params"])
    target_nll = heldout_nll(best_model, x_test, y_test)
    result = {"optimum_nll": optimum, "heldout_nll_at_optimum": target_nll, "bounds": {}}
    for bound, run in runs.items():
        entry = {"iterations_run": len(run["losses"]) - 1, "final_gap": run["losses"][-1] - optimum}
        for tol in TOLERANCES:
            index = first_within(run["losses"], optimum, tol)
            entry[f"iterations_to_{tol:g}"] = index
            entry[f"seconds_to_{tol:g}"] = None if index is None else run["seconds"][index]
        entry["seconds_per_iteration"] = run["seconds"][-1] / max(1, len(run["losses"]) - 1)
        entry["curve"] = [loss - optimum for loss in run["losses"]]
        stream = [
            stream_run(bound, truth, num_experts, args, seed, x_test, y_test, target_nll)
            for seed in args.seeds
        ]
        entry["stream"] = {
            "samples_to_tol": median_or_none([s["reached"] and s["reached"][0] for s in stream]),
            "seconds_to_tol": median_or_none([s["reached"] and s["reached"][1] for s in stream]),
            "runs_reaching_tol": sum(s["reached"] is not None for s in stream),
            "final_gap": statistics.median(s["final_gap"] for s in stream),
            "curves": [s["curve"] for s in stream],
        }
        result["bounds"][bound] = entry
    return result


def fmt(value, spec):
    return "not reached" if value is None else format(value, spec)


def render(results):
    args = results["args"]
    lines = [
        "# Gate curvature bounds: Böhning vs the paper's (and Jaakkola-Jordan for K = 2)",
        "",
        f"Command: `{results['command'].strip()}`; {results['threads']} torch thread(s); load "
        f"average at start {tuple(round(v, 2) for v in results['load_average'])}.",
        "",
        f"(a) Batch MM on {args['num_train']} training rows (P = {IN_FEATURES}, Q = 1), common "
        f"K-means start; L* = lowest training NLL reached by any bound (max {args['max_iter']} "
        "iterations); seconds: cumulative time of the MM iterations alone.",
        "",
        "| K | bound | iterations to L*+1e-3 | to L*+1e-6 | seconds to L*+1e-3 | to L*+1e-6 | "
        "ms / iteration | final gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for num_experts, result in results["experts"].items():
        for bound, e in result["bounds"].items():
            lines.append(
                f"| {num_experts} | {bound} | {fmt(e['iterations_to_0.001'], 'd')} | "
                f"{fmt(e['iterations_to_1e-06'], 'd')} | {fmt(e['seconds_to_0.001'], '.3f')} | "
                f"{fmt(e['seconds_to_1e-06'], '.3f')} | {1e3 * e['seconds_per_iteration']:.2f} | "
                f"{e['final_gap']:.1e} |"
            )
    lines += [
        "",
        f"(b) Incremental MM on a stream (batch {args['stream_batch']}, "
        f"{args['stream_batches']} batches, gamma_n = n^-0.6, K-means on the first batch); target: "
        f"held-out NLL ({args['num_test']} rows) within {args['stream_tol']} of the held-out NLL at "
        f"the batch optimum of (a); medians over stream seeds {args['seeds']}.",
        "",
        "| K | bound | samples to target | seconds to target | runs reaching it | final gap | "
        "final gap per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for num_experts, result in results["experts"].items():
        for bound, e in result["bounds"].items():
            s = e["stream"]
            lines.append(
                f"| {num_experts} | {bound} | {fmt(s['samples_to_tol'], ',.0f')} | "
                f"{fmt(s['seconds_to_tol'], '.3f')} | {s['runs_reaching_tol']}/{len(args['seeds'])} "
                f"| {s['final_gap']:.2e} | "
                + ", ".join(f"{curve[-1][2]:.1e}" for curve in s["curves"])
                + " |"
            )
    lines += ["", "## Which bound is the default, and why", ""] + conclusion(results)
    return "\n".join(lines) + "\n"


def conclusion(results):
    """The recommendation, with the figures of this run."""
    ratios, stream = [], []
    for num_experts, result in results["experts"].items():
        bounds = result["bounds"]
        if int(num_experts) < 3:
            continue
        b, p = bounds["bohning"]["iterations_to_1e-06"], bounds["paper"]["iterations_to_1e-06"]
        b3, p3 = bounds["bohning"]["iterations_to_0.001"], bounds["paper"]["iterations_to_0.001"]
        ratios.append(
            f"K = {num_experts}: {fmt(p3, 'd')} vs {fmt(b3, 'd')} iterations to 1e-3, "
            f"{fmt(p, 'd')} vs {fmt(b, 'd')} to 1e-6"
        )
        stream.append(
            f"K = {num_experts}: final held-out gap {bounds['paper']['stream']['final_gap']:.2e} "
            f"(paper) vs {bounds['bohning']['stream']['final_gap']:.2e} (Böhning)"
        )
    lines = [
        "**Böhning's bound is the default.** Both bounds majorise the softmax Hessian, so both "
        "give monotone MM; Böhning's ``C = 1/2 (I - 11^T/K)`` is dominated by the paper's "
        "``3/4 I - 11^T/(2(K-1))`` in the Loewner order (equal for K = 2), so its surrogate is "
        "tighter and every MM step is longer, at the same cost per iteration (the same "
        "Kronecker solve). Measured here (paper vs Böhning), batch MM: "
        + "; ".join(ratios)
        + ". Incremental MM after one pass (median over seeds): "
        + "; ".join(stream)
        + ". The stream runs of a seed may end in different local optima for the two bounds "
        "(see the per-seed gaps), so single seeds can favour either; the medians and the batch "
        "runs, which share one start, favour Böhning. The eigenvalues say why: orthogonal to the all-ones direction the paper's curvature "
        "is 3/4 against Böhning's 1/2 (1.5 times), along it 1/4 against 1/(2K) (K/2 times), so "
        "its steps are shorter for every K >= 3, and more so in the directions that move all "
        "non-reference experts together as K grows.",
    ]
    if "2" in results["experts"] or 2 in results["experts"]:
        two = results["experts"].get(2) or results["experts"].get("2")
        jj, bo = two["bounds"]["jaakkola-jordan"], two["bounds"]["bohning"]
        lines += [
            "",
            "For K = 2 the two constant bounds coincide (1/4), and the per-sample "
            "Jaakkola-Jordan bound (curvature ``tanh(xi/2)/(2 xi) <= 1/4`` at each sample's "
            f"current logit) is tighter still: {fmt(jj['iterations_to_0.001'], 'd')} vs "
            f"{fmt(bo['iterations_to_0.001'], 'd')} iterations to 1e-3 and "
            f"{fmt(jj['iterations_to_1e-06'], 'd')} vs {fmt(bo['iterations_to_1e-06'], 'd')} "
            f"to 1e-6; samples to the stream target {fmt(jj['stream']['samples_to_tol'], ',.0f')} "
            f"vs {fmt(bo['stream']['samples_to_tol'], ',.0f')}. It is offered as "
            "``gate_bound='jaakkola-jordan'`` (K = 2 only); it is not the default because it "
            "does not exist for K >= 3 and the default should not depend on K.",
        ]
    lines += [
        "",
        "Wall times were measured on a shared 2-core machine (load average above); the "
        "iteration and sample counts are the robust comparison, the seconds are indicative.",
    ]
    return lines


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = list(results["experts"])
    figure, axes = plt.subplots(2, len(experts), figsize=(4 * len(experts), 7), squeeze=False)
    for column, num_experts in enumerate(experts):
        for bound, e in results["experts"][num_experts]["bounds"].items():
            gaps = [max(g, 1e-16) for g in e["curve"]]
            axes[0, column].semilogy(gaps, label=bound)
            curve = e["stream"]["curves"][0]
            axes[1, column].semilogy(
                [c[0] for c in curve], [max(c[2], 1e-6) for c in curve], label=bound
            )
        axes[0, column].set_title(f"K = {num_experts}: batch MM")
        axes[0, column].set_xlabel("iteration")
        axes[0, column].set_ylabel("training NLL - L*")
        axes[1, column].set_title(f"K = {num_experts}: incremental MM (first seed)")
        axes[1, column].set_xlabel("samples")
        axes[1, column].set_ylabel("held-out NLL - batch optimum (floor 1e-6)")
        axes[0, column].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 3, 5, 8])
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-test", type=int, default=20000)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--stream-batch", type=int, default=100)
    parser.add_argument("--stream-batches", type=int, default=500)
    parser.add_argument("--stream-tol", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/bounds.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "args": vars(args),
        "experts": {},
    }
    for num_experts in args.experts:
        results["experts"][num_experts] = compare(num_experts, args)
        print(f"K = {num_experts} done", file=sys.stderr)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bounds.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render(results)
    with open(os.path.join(RESULTS, "bounds.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(RESULTS, "bounds.png"))
    print(table)


if __name__ == "__main__":
    main()
