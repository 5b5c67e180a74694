"""The incremental-MM paper's synthetic experiments (000, Sections 5.2 and 5.3): Tables 1-5 and
the log-likelihood trajectories of Figures 2 and 4, every fitting method in one run.

Data (:mod:`pyro_mm.datasets.paper_synthetic`, where the paper's gaps are filled in writing):
a softmax-gated Gaussian MoE with K = 2, D_W = D_V = 1, Q = 1; ``"low"``: P = 2 with the
paper's Section 5.2 parameters, ``"high"``: P = 10 with its Algorithm 4 (``s_e = 0``);
2 x 1000 rows, ``x ~ N(0, I_P)``, the first 80% train, the last 20% test; one draw per seed.

Tables (data-driven start), for every seed:

* one K-means start (scikit-learn, 10 restarts, gate at zero: the paper's "Incremental MM")
  on the training rows, shared by every method;
* every method reads the same training stream in the same order: ``--epochs`` passes in
  mini-batches of ``--batch-size`` rows (EM: one full-data iteration per pass, so the same
  number of passes);
* the learning rate of each gradient method is chosen from ``--grid`` by the held-out NLL of a
  validation split (20% of the training rows of the first seed), then kept for every seed;
* metrics on the test rows (:func:`pyro_mm.metrics.evaluate_fit`): estimation errors
  (``E[y|x]`` fitted vs. true), prediction errors (``E[y|x]`` vs. ``y``), held-out NLL,
  permutation-aligned relative parameter error; mean (sd) over seeds.

Trajectories (perturbed-truth start, the paper's Sections 5.2.1 and 5.3.1): the truth plus
``0.005 N(0, 1)`` noise, ``s_0`` from the first 85 training rows, then Algorithm 2 (one row per
step, ``gamma_n = 0.2 n^-0.6``: with ``gamma_1 = 1`` the first row would replace the
85-row ``s_0``) over the 1600 training rows, Polyak averaging from
``N_0 = 100``; the mean training log-likelihood of the iterate and of the average every 10
steps (seed 0), and the parameter errors of Table 3 (all seeds).

Run ``python benchmarks/paper_synthetic.py --help`` for the options.
"""

import argparse
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoDelta
from pytorch_optimizer import SophiaH

from pyro_mm import GaussianMoE, IncrementalMM, MoEPriors, PowerDecay, SVIFit
from pyro_mm.datasets import paper_synthetic
from pyro_mm.infer import EM, Method, MirrorDescentEM, compare_methods
from pyro_mm.metrics import align_experts, mean_nll, parameter_error
from pyro_mm.models.params import tree_map

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SETUPS = {"low": "Sec. 5.2, P = 2", "high": "Sec. 5.3, P = 10 (Alg. 4)"}

#: The paper's Tables 1, 2, 4 and 5 (MSE, MAPE, NRMSE) and Table 3 (Omega, Upsilon, Sigma).
PAPER_TABLES = {
    ("low", "estimation"): {
        "Inc. MM": (0.014, 0.228, 0.009),
        "SGD": (0.415, 2.230, 0.050),
        "Adam": (0.824, 1.272, 0.061),
        "AdamW": (0.192, 1.816, 0.035),
        "RMSProp": (0.322, 0.545, 0.042),
        "Sophia": (0.272, 1.633, 0.042),
    },
    ("low", "prediction"): {
        "Inc. MM": (0.950, 0.480, 0.059),
        "SGD": (1.517, 0.332, 0.075),
        "Adam": (1.789, 0.422, 0.082),
        "AdamW": (1.139, 0.219, 0.065),
        "RMSProp": (1.505, 0.478, 0.075),
        "Sophia": (1.256, 0.257, 0.069),
    },
    ("high", "estimation"): {
        "Inc. MM": (2.809, 0.197, 0.081),
        "SGD": (3.278, 0.243, 0.073),
        "Adam": (3.402, 0.245, 0.074),
        "AdamW": (2.904, 0.233, 0.080),
        "RMSProp": (2.840, 0.226, 0.079),
        "Sophia": (2.912, 0.256, 0.077),
    },
    ("high", "prediction"): {
        "Inc. MM": (4.397, 0.293, 0.098),
        "SGD": (4.607, 0.304, 0.099),
        "Adam": (4.725, 1.148, 0.087),
        "AdamW": (4.434, 0.439, 0.090),
        "RMSProp": (4.478, 0.359, 0.106),
        "Sophia": (4.674, 0.314, 0.105),
    },
}
PAPER_TABLE_3 = {
    "Omega": (0.0051, 0.4750, 0.0087),
    "Upsilon": (0.1849, 1.3460, 0.0917),
    "Sigma": (0.0015, 0.0183, 0.0435),
}
#: Our method names for the paper's rows.
PAPER_ROWS = {
    "Inc. MM": "Incremental MM",
    "SGD": "SGD",
    "Adam": "Adam",
    "AdamW": "AdamW",
    "RMSProp": "RMSProp",
    "Sophia": "SophiaH",
}
GRADIENT_METHODS = ("SVI-MAP (AutoDelta)", "SVI-ML", "SGD", "Adam", "AdamW", "RMSProp", "SophiaH")


# ------------------------------------------------------------------------------------ methods
def build_methods(args, steps: int):
    """Every compared method as a :class:`~pyro_mm.infer.compare.Method`.

    :param int steps: mini-batch steps of one fit (``epochs * batches per pass``).
    """
    grid = tuple(args.grid)

    def gradient(optimizer, **extra):
        def build(model, learning_rate):
            return SVIFit(
                model,
                optim=optimizer,
                optim_args={"lr": learning_rate, **extra},
                init="current",
                seed=args.seed,
            )

        return build

    def pyro_svi(optimizer_class, guide=None):
        def build(model, learning_rate):
            return SVIFit(
                model, guide, optimizer_class({"lr": learning_rate}), init="current", seed=args.seed
            )

        return build

    methods = [
        Method("Incremental MM", lambda m: IncrementalMM(m, init="current")),
        Method(
            "Incremental MM + Polyak",
            lambda m: IncrementalMM(m, polyak_start=steps // 2, init="current"),
        ),
        Method(
            "Incremental MM (JJ bound)",
            lambda m: IncrementalMM(m, gate_bound="jaakkola-jordan", init="current"),
        ),
        Method("EM", lambda m: EM(m, init="current")),
        Method(
            "MirrorDescentEM",
            lambda m: MirrorDescentEM(m, step_size=PowerDecay(1.0, 0.6), init="current"),
        ),
        Method(
            "SVI-MAP (AutoDelta)",
            pyro_svi(pyro.optim.Adam, AutoDelta),
            learning_rates=grid,
            priors=MoEPriors(),
        ),
        Method("SVI-ML", pyro_svi(pyro.optim.ClippedAdam), learning_rates=grid),
        Method("SGD", gradient(torch.optim.SGD), learning_rates=grid),
        Method("Adam", gradient(torch.optim.Adam), learning_rates=grid),
        Method("AdamW", gradient(torch.optim.AdamW), learning_rates=grid),
        Method("RMSProp", gradient(torch.optim.RMSprop), learning_rates=grid),
        Method("SophiaH", gradient(SophiaH, p=args.sophia_clip), learning_rates=grid),
    ]
    return [m for m in methods if args.methods is None or m.name in args.methods]


# --------------------------------------------------------------------------------- the tables
def run_tables(setup: str, args) -> dict:
    """Every method on every seed of ``setup``; learning rates tuned on the first seed."""
    per_seed, tuned, searches, histories = {}, None, {}, {}
    for seed in range(args.seeds):
        data = paper_synthetic(setup, seed=seed)
        num_features = data.x_train.shape[1]
        make_model = functools.partial(GaussianMoE, 2, num_features, 1)
        steps = args.epochs * -(-len(data.x_train) // args.batch_size)
        results = compare_methods(
            build_methods(args, steps),
            make_model,
            data.x_train,
            data.y_train,
            data.x_test,
            data.y_test,
            truth=data.truth,
            batch_size=args.batch_size,
            epochs=args.epochs,
            learning_rates=tuned,
            seed=seed,
            progress=args.progress,
        )
        if tuned is None:
            tuned = {n: r.learning_rate for n, r in results.items() if r.learning_rate is not None}
            searches = {
                n: {
                    "grid": r.search.grid,
                    "validation_nll": r.search.validation_nll,
                    "best": r.search.best,
                    "failures": {str(k): v for k, v in r.search.failures.items()},
                }
                for n, r in results.items()
                if r.search is not None
            }
            histories = {n: r.history.as_dict() for n, r in results.items()}
            histories["truth_train_nll"] = mean_nll(
                make_model().double(), data.x_train, data.y_train, data.truth
            )
        per_seed[seed] = {
            n: {
                **r.metrics,
                **{
                    f"{block}_error": value
                    for block, value in parameter_error(r.params, data.truth).items()
                    if block != "total"
                },
                "fit_seconds": r.fit_seconds,
                "warnings": r.warnings,
            }
            for n, r in results.items()
        }
        print(
            f"  {setup} seed {seed}: "
            + ", ".join(f"{n} {r.metrics['estimation_mse']:.4f}" for n, r in results.items()),
            flush=True,
        )
    return {
        "per_seed": per_seed,
        "learning_rates": tuned,
        "searches": searches,
        "histories_seed0": histories,
        "summary": summarise(per_seed),
    }


def summarise(per_seed: dict) -> dict:
    """``{method: {metric: [mean, sd]}}`` over seeds (sd 0 for one seed)."""
    methods = next(iter(per_seed.values())).keys()
    summary = {}
    for method in methods:
        rows = [per_seed[s][method] for s in per_seed]
        summary[method] = {}
        for metric, value in rows[0].items():
            if isinstance(value, (int, float)):
                values = [r[metric] for r in rows]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[method][metric] = [statistics.fmean(values), sd]
    return summary


# --------------------------------------------------------------------------- the trajectories
def perturbed_truth(truth, scale: float, seed: int):
    """``truth + scale * N(0, 1)`` element-wise (the paper's perturbed-truth start)."""
    generator = torch.Generator().manual_seed(seed)
    return tree_map(
        lambda t: t + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype), truth
    )


def block_errors(estimate, truth) -> dict:
    """Table 3: MSE, MAPE and NRMSE of each parameter block after aligning the experts.

    MAPE is over the non-zero entries of the truth (most true coefficients are zero);
    NRMSE is the RMSE over the range of the true block (over its absolute value for a block
    with a single distinct value).
    """
    aligned = align_experts(estimate, truth)
    blocks = {
        "Omega": (aligned.gate, truth.gate),
        "Upsilon": (aligned.experts.weight, truth.experts.weight),
        "Sigma": (aligned.experts.variance, truth.experts.variance),
    }
    errors = {}
    for name, (est, ref) in blocks.items():
        diff = est - ref
        nonzero = ref != 0
        spread = (ref.max() - ref.min()).item() or ref.abs().max().item()
        errors[name] = {
            "mse": diff.square().mean().item(),
            "mape": (diff[nonzero].abs() / ref[nonzero].abs()).mean().item(),
            "nrmse": diff.square().mean().sqrt().item() / spread,
        }
    return errors


def run_trajectories(setup: str, args) -> dict:
    """Algorithm 2 from a perturbed truth, with Polyak averaging (Figures 2a and 4, Table 3)."""
    trajectory, tables = None, {"iterate": [], "polyak": []}
    for seed in range(args.seeds):
        data = paper_synthetic(setup, seed=seed)
        model = GaussianMoE(2, data.x_train.shape[1], 1).double()
        model.set_params(perturbed_truth(data.truth, 0.005, seed))
        mm = IncrementalMM(
            model,
            schedule=PowerDecay(args.trajectory_gamma0, 0.6),
            polyak_start=100,
            init="current",
        )
        mm.initialize(data.x_train[:85], data.y_train[:85])
        start = -mean_nll(model, data.x_train, data.y_train, mm.params)
        steps, iterate, polyak = [0], [start], [start]
        for row in range(len(data.x_train)):
            mm.step(data.x_train[row : row + 1], data.y_train[row : row + 1])
            if seed == 0 and (row + 1) % 10 == 0:
                steps.append(row + 1)
                iterate.append(-mean_nll(model, data.x_train, data.y_train, mm.params))
                polyak.append(-mean_nll(model, data.x_train, data.y_train, mm.estimate))
        if seed == 0:
            trajectory = {
                "step": steps,
                "iterate_loglik": iterate,
                "polyak_loglik": polyak,
                "truth_loglik": -mean_nll(model, data.x_train, data.y_train, data.truth),
            }
        tables["iterate"].append(block_errors(mm.params, data.truth))
        tables["polyak"].append(block_errors(mm.estimate, data.truth))
    summary = {
        kind: {
            block: {
                metric: [
                    statistics.fmean(r[block][metric] for r in rows),
                    statistics.stdev(r[block][metric] for r in rows) if len(rows) > 1 else 0.0,
                ]
                for metric in ("mse", "mape", "nrmse")
            }
            for block in ("Omega", "Upsilon", "Sigma")
        }
        for kind, rows in tables.items()
    }
    return {"seed0": trajectory, "table3": summary}


# ------------------------------------------------------------------------------------ output
def cell(stats, digits: int = 4) -> str:
    return f"{stats[0]:.{digits}f} ({stats[1]:.{digits}f})"


def wide_cell(stats) -> str:
    """Three significant digits (MAPE spans many orders of magnitude)."""
    return f"{stats[0]:.3g} ({stats[1]:.3g})"


def error_table(summary: dict, kind: str, paper: dict, tuned: dict) -> str:
    """A table shaped like the paper's Tables 1/2/4/5, with our extra columns and the paper's."""
    lines = [
        "| Method | MSE | MAPE | NRMSE | held-out NLL | parameter error | seconds | lr "
        "| paper MSE / MAPE / NRMSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours_to_paper = {v: k for k, v in PAPER_ROWS.items()}
    best = min(summary, key=lambda m: summary[m][f"{kind}_mse"][0])
    for method, stats in summary.items():
        paper_row = paper.get(ours_to_paper.get(method))
        paper_text = "" if paper_row is None else " / ".join(f"{v:.3f}" for v in paper_row)
        name = f"**{method}**" if method == best else method
        lr = tuned.get(method)
        lines.append(
            f"| {name} | {cell(stats[f'{kind}_mse'])} | {wide_cell(stats[f'{kind}_mape'])} "
            f"| {cell(stats[f'{kind}_nrmse'])} | {cell(stats['heldout_nll'])} "
            f"| {cell(stats['parameter_error'], 3)} | {cell(stats['fit_seconds'], 2)} "
            f"| {'' if lr is None else f'{lr:g}'} | {paper_text} |"
        )
    return "\n".join(lines)


def table3(summary: dict) -> str:
    lines = [
        "| Parameters | MSE (iterate) | MAPE (iterate) | NRMSE (iterate) | MSE (Polyak) "
        "| MAPE (Polyak) | NRMSE (Polyak) | paper MSE / MAPE / NRMSE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for block in ("Omega", "Upsilon", "Sigma"):
        it, av = summary["iterate"][block], summary["polyak"][block]
        lines.append(
            f"| {block} | {cell(it['mse'])} | {cell(it['mape'])} | {cell(it['nrmse'])} "
            f"| {cell(av['mse'])} | {cell(av['mape'])} | {cell(av['nrmse'])} "
            f"| {' / '.join(f'{v:.4f}' for v in PAPER_TABLE_3[block])} |"
        )
    return "\n".join(lines)


def search_table(searches: dict) -> str:
    lines = ["| Method | grid | validation NLL per lr | chosen |", "|---|---|---|---|"]
    for method, s in searches.items():
        scores = ", ".join("diverged" if math.isinf(v) else f"{v:.4f}" for v in s["validation_nll"])
        edge = " (edge of the grid)" if s["best"] in (min(s["grid"]), max(s["grid"])) else ""
        lines.append(
            f"| {method} | {', '.join(f'{v:g}' for v in s['grid'])} | {scores} "
            f"| {s['best']:g}{edge} |"
        )
    return "\n".join(lines)


def verdict(results: dict) -> list:
    """Is incremental MM's estimation MSE the lowest? By how much, if not? Where is the gap?"""
    lines = []
    for setup, res in results["tables"].items():
        summary = res["summary"]
        ranked = sorted(summary, key=lambda m: summary[m]["estimation_mse"][0])
        ours = summary["Incremental MM"]["estimation_mse"][0]
        best = ranked[0]
        best_value = summary[best]["estimation_mse"][0]
        mm_variants = [m for m in ranked if m.startswith("Incremental MM")]
        if best.startswith("Incremental MM"):
            runner_up = next(m for m in ranked if not m.startswith("Incremental MM"))
            lines.append(
                f"- {setup}: **met** by {best} ({best_value:.4f}); best other method "
                f"{runner_up} ({summary[runner_up]['estimation_mse'][0]:.4f})."
            )
        else:
            best_mm = mm_variants[0]
            value = summary[best_mm]["estimation_mse"][0]
            lines.append(
                f"- {setup}: **not met**: lowest estimation MSE {best} {best_value:.4f}; "
                f"best incremental MM ({best_mm}) {value:.4f} = {value / best_value:.2f} x, "
                f"rank {ranked.index(best_mm) + 1} of {len(ranked)}; the default incremental MM "
                f"{ours:.4f} = {ours / best_value:.2f} x, rank "
                f"{ranked.index('Incremental MM') + 1}."
            )
        gate = {m: summary[m]["gate_error"][0] for m in ("Incremental MM", best)}
        experts = {m: summary[m]["weight_error"][0] for m in ("Incremental MM", best)}
        lines.append(
            f"  Relative errors of the aligned gate / expert coefficients: incremental MM "
            f"{gate['Incremental MM']:.3f} / {experts['Incremental MM']:.3f}, {best} "
            f"{gate[best]:.3f} / {experts[best]:.3f}."
        )
    return lines


def paper_comparison(results: dict) -> list:
    """The paper's headline numbers beside this run's, and what differs in the setup."""
    cfg = results["config"]
    rows = [
        ("low", "Table 1", "Inc. MM"),
        ("low", "Table 1", "AdamW"),
        ("high", "Table 4", "Inc. MM"),
        ("high", "Table 4", "RMSProp"),
    ]
    lines = [
        "| Table | method | paper estimation MSE | this run (mean (sd)) | best method of this run |",
        "|---|---|---|---|---|",
    ]
    for setup, table, paper_name in rows:
        if setup not in results["tables"]:
            continue
        summary = results["tables"][setup]["summary"]
        best = min(summary, key=lambda m: summary[m]["estimation_mse"][0])
        ours = summary[PAPER_ROWS[paper_name]]["estimation_mse"]
        lines.append(
            f"| {table} | {PAPER_ROWS[paper_name]} | "
            f"{PAPER_TABLES[(setup, 'estimation')][paper_name][0]:.3f} | {cell(ours)} "
            f"| {best} {summary[best]['estimation_mse'][0]:.4f} |"
        )
    lines += [
        "",
        "What differs from the paper's setup: the paper does not give the law of the inputs, "
        "its NRMSE normalisation, nor the baselines' batch sizes, passes or learning-rate "
        f"protocol. Here the inputs are N(0, I), every method reads the same {cfg['epochs']} "
        f"passes of mini-batches of {cfg['batch_size']} from one K-means start, the "
        "baselines' learning rates are chosen on a validation split, everything runs in "
        f"float64, and incremental MM takes mini-batches of {cfg['batch_size']} (not one row "
        "per step) with gamma_n = n^-0.6. The paper's "
        "baselines are 10-60 times worse than its incremental MM in Table 1, and in Table 4 "
        "every method, incremental MM included, has an estimation MSE near 3.",
        "",
    ]
    baselines = ("SGD", "Adam", "AdamW", "RMSProp", "SophiaH")
    for setup, res in results["tables"].items():
        summary = res["summary"]
        mm = summary["Incremental MM"]["estimation_mse"][0]
        em = summary["EM"]["estimation_mse"][0]
        ratios = [summary[b]["estimation_mse"][0] / mm for b in baselines if b in summary]
        lines.append(
            f"- Here ({setup}), the paper's baselines have {min(ratios):.2f} to "
            f"{max(ratios):.2f} times incremental MM's estimation MSE, and incremental MM has "
            f"{mm / em:.2f} times that of EM ({cfg['epochs']} iterations toward the MLE)."
        )
    return lines


def plot(results: dict, path_prefix: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for setup, res in results["trajectories"].items():
        traj = res["seed0"]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot(traj["step"], traj["iterate_loglik"], color="black", lw=1, label="iterate")
        ax.plot(traj["step"], traj["polyak_loglik"], color="red", lw=1.2, label="Polyak average")
        ax.axhline(traj["truth_loglik"], color="grey", ls="--", lw=0.8, label="true parameters")
        ax.set_xlabel("iteration (one training row per step)")
        ax.set_ylabel("mean training log-likelihood")
        ax.set_title(f"Incremental MM (Alg. 2) from a perturbed truth, {SETUPS[setup]}")
        ax.legend()
        fig.tight_layout()
        path = f"{path_prefix}_trajectory_{setup}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    epochs = results["config"]["epochs"]
    for setup, res in results["tables"].items():
        histories = dict(res["histories_seed0"])
        truth_nll = histories.pop("truth_train_nll")
        fig, ax = plt.subplots(figsize=(7.2, 4.4))
        colours = plt.get_cmap("tab20").colors
        for index, (method, history) in enumerate(histories.items()):
            # The batches of a pass partition the training rows equally, so the mean batch NLL
            # of a pass minus the truth's training NLL is the paper's "distance to the true
            # log-likelihood" along the pass (EM: one full-data iteration per pass).
            per_pass = np.asarray(history["loss"]).reshape(epochs, -1).mean(1) - truth_nll
            style = "-" if method.startswith("Incremental MM") or "EM" in method else "--"
            ax.plot(
                np.arange(1, epochs + 1),
                per_pass,
                lw=1.2,
                ls=style,
                marker="o",
                ms=2.5,
                color=colours[index % 20],
                label=method,
            )
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("pass over the training rows")
        ax.set_ylabel("mean training NLL of the pass - NLL of the truth")
        ax.set_title(f"All methods from the K-means start, seed 0: {SETUPS[setup]}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = f"{path_prefix}_methods_{setup}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(results: dict, command: str, figures: list) -> str:
    cfg = results["config"]
    parts = [
        "# Paper 000, Sections 5.2-5.3: synthetic Tables 1-5, every method in one run",
        "",
        f"Command: `{command}`",
        "",
        f"Run: {cfg['seeds']} seeds (data draws 0..{cfg['seeds'] - 1}), {cfg['epochs']} passes "
        f"over the 1600 training rows in mini-batches of {cfg['batch_size']} (EM: "
        f"{cfg['epochs']} full-data iterations), one K-means start (gate at zero) per seed "
        f"shared by all methods, learning rates from the grid {cfg['grid']} chosen on a 20% "
        f"validation split of seed 0 and kept for all seeds; SophiaH clip p = "
        f"{cfg['sophia_clip']}. {cfg['torch_threads']} torch thread(s); load average at start "
        f"{cfg['load_average']}; total {results['seconds']:.0f} s wall, "
        f"{results['cpu_seconds']:.0f} s CPU (the machine is shared). Cells: mean (sd) over seeds; "
        f"bold: lowest MSE. Estimation errors compare the fitted and the true E[y|x] on the "
        f"400 test inputs, prediction errors the fitted E[y|x] with the test y; NRMSE = RMSE / "
        f"range of the reference values. The generator, and what the paper leaves open, is "
        f"written down in `pyro_mm/datasets/paper_synthetic.py`.",
        "",
        "## Does incremental MM have the lowest estimation MSE?",
        "",
        *verdict(results),
        "",
        "## The paper's numbers beside ours",
        "",
        *paper_comparison(results),
        "",
    ]
    titles = {
        ("low", "estimation"): "Table 1: estimation errors, low-dimensional (P = 2)",
        ("low", "prediction"): "Table 2: prediction errors, low-dimensional (P = 2)",
        ("high", "estimation"): "Table 4: estimation errors, higher-dimensional (P = 10)",
        ("high", "prediction"): "Table 5: prediction errors, higher-dimensional (P = 10)",
    }
    for (setup, kind), title in titles.items():
        if setup not in results["tables"]:
            continue
        res = results["tables"][setup]
        parts += [
            f"## {title}",
            "",
            error_table(res["summary"], kind, PAPER_TABLES[(setup, kind)], res["learning_rates"]),
            "",
        ]
        if kind == "estimation" and setup == "low":
            parts += [
                "MAPE divides by the true E[y|x], which is close to 0 wherever expert 1 (mean 0) "
                "holds the gate (x_1 > 0): a handful of rows dominate it, so it is not a useful "
                "ranking here (the paper's inputs must have kept E[y|x] away from 0).",
                "",
            ]
        if kind == "estimation" and setup == "high" and "high" in results["trajectories"]:
            parts += [
                "## Table 3: parameter errors, P = 10, perturbed-truth start (Algorithm 2, "
                f"gamma_n = {cfg['trajectory_gamma0']} n^-0.6, Polyak from N_0 = 100)",
                "",
                table3(results["trajectories"]["high"]["table3"]),
                "",
                "Blocks after aligning the experts; MAPE over the non-zero true entries only. Our "
                "gate and expert blocks carry one intercept (the paper's carry one per input "
                "coordinate), so the blocks' sizes differ from the paper's.",
                "",
            ]
    for setup, res in results["tables"].items():
        parts += [f"## Learning-rate search ({setup})", "", search_table(res["searches"]), ""]
    parts += ["## Figures", ""] + [
        f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures
    ]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", default=["low", "high"], choices=list(SETUPS))
    parser.add_argument("--seeds", type=int, default=5, help="data draws 0..seeds-1")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grid", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument(
        "--sophia-clip", type=float, default=1.0, help="SophiaH's clip p (library default 0.01)"
    )
    parser.add_argument(
        "--trajectory-gamma0",
        type=float,
        default=0.2,
        help="gamma_0 of the trajectory runs (1 would discard the 85-row s_0 at the first step)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="subset of method names")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SVI fits' draws")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "paper_synthetic"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
    command = "python benchmarks/paper_synthetic.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    results = {
        "config": {
            **{k: v for k, v in vars(args).items() if k != "output"},
            "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
        },
        "tables": {},
        "trajectories": {},
    }
    for setup in args.setups:
        print(f"{setup}: tables", flush=True)
        results["tables"][setup] = run_tables(setup, args)
        print(f"{setup}: trajectories", flush=True)
        results["trajectories"][setup] = run_trajectories(setup, args)
    results["seconds"] = time.perf_counter() - start
    results["cpu_seconds"] = time.process_time() - cpu_start
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    figures = plot(results, args.output)
    with open(args.output + ".json", "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results, command.strip(), figures)
    with open(args.output + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
