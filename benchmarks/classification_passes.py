"""Why the gradient methods beat incremental MM on the small real classification sets: the best
gradient method of ``classification.md`` at its budget (50 passes) and run ten times longer
(500 passes), against EM run to convergence, on the same penalised objective.

For each real data set of ``benchmarks/results/classification.json`` and each of its three
repetitions (the same split, K-means start, L2 strength and tuned learning rate as there), this
fits the data set's best gradient method (lowest mean test log-loss) for 50 and for 500 passes
and EM to convergence (at most ``--em-max-iter`` iterations), and reports the test log-loss
and the penalised training objective ``mean NLL + lambda/2 ||weights||^2`` of each fit. If the
longer fit lowers the training objective but raises the test log-loss towards converged EM's,
the budgeted fit's edge is early stopping (implicit regularisation), which a method that
converges on the penalised objective does not have.

Run ``python benchmarks/classification_passes.py`` (about 10 minutes, one thread) after
``benchmarks/classification.py``. Writes ``benchmarks/results/classification_passes.{json,md}``.
"""

import argparse
import functools
import json
import os

import classification as benchmark
import numpy as np
import torch

from pyro_mm import MultinomialMoE
from pyro_mm.infer.compare import fit_method
from pyro_mm.init import kmeans_init

PASSES = (50, 500)
REAL_DATASETS = ("iris", "wine", "breast_cancer", "digits")


def penalised_objective(model, x, y, l2: float) -> float:
    """``mean NLL + l2/2 (||W||^2 + sum_k ||V_k||^2)``, the objective every method minimises."""
    with torch.no_grad():
        params = model.get_params()
        squares = params.gate.square().sum() + params.experts.weight.square().sum()
        return -model.log_prob(x, y).mean().item() + 0.5 * l2 * squares.item()


def run_dataset(result: dict, args) -> dict:
    name, tuned = result["dataset"], result["tuned"]
    l2 = tuned["L2"]
    best = min(benchmark.GRADIENT_GRIDS, key=lambda m: result["summary"][m]["log_loss"][0])
    data_args = argparse.Namespace(experts=args.experts)
    repetitions = []
    for repetition in result["repetitions"]:
        seed = repetition["seed"]
        data = benchmark.load_dataset(name, seed, data_args)
        make_model = functools.partial(
            MultinomialMoE, data.num_experts, data.x_train.shape[1], data.num_classes
        )
        init_params = kmeans_init(make_model().double(), data.x_train, data.y_train, seed=seed)
        # MirrorDescentEM's batch size (1 here) plays no part in the gradient methods.
        methods = benchmark.build_methods(l2, 1, seed, data.num_experts)
        method = next(m for m in methods if m.name == best)
        fits = {}
        for passes in PASSES:
            model, *_ = fit_method(
                method,
                make_model,
                data.x_train,
                data.y_train,
                init_params=init_params,
                batch_size=benchmark.BATCH_SIZES[name],
                epochs=passes,
                learning_rate=tuned[best],
            )
            fits[f"{best}, {passes} passes"] = model
        converged, em = benchmark.em_to_convergence(make_model, init_params, l2)
        em.fit(data.x_train, data.y_train, max_iter=args.em_max_iter, progress=False)
        fits["EM (converged)"] = converged
        repetitions.append(
            {
                "seed": seed,
                "em_iterations": em.num_iterations,
                "em_converged": em.converged,
                "rows": {
                    label: {
                        "test_log_loss": benchmark.test_metrics(model, data)["log_loss"],
                        "train_objective": penalised_objective(
                            model, data.x_train, data.y_train, l2
                        ),
                    }
                    for label, model in fits.items()
                },
            }
        )
        print(f"{name} seed {seed}: {repetitions[-1]['rows']}", flush=True)
    return {"dataset": name, "method": best, "l2": l2, "repetitions": repetitions}


def markdown(results, em_max_iter: int) -> str:
    lines = [
        "Command: `python benchmarks/classification_passes.py` (the splits, starts, L2 strengths "
        "and learning rates of `classification.json`).",
        "",
        "Each data set's best gradient method at the benchmark's budget and ten times longer, "
        f"and EM run to convergence (mean-NLL change < {benchmark.EM_TOL:g}, at most {em_max_iter} "
        "iterations): mean (sd) "
        "over the 3 repetitions of the test log-loss and of the penalised training objective "
        "(mean NLL + lambda/2 ||weights||^2).",
        "",
        "| data set | fit | test log-loss | training objective | per repetition (test) |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        labels = list(result["repetitions"][0]["rows"])
        converged = sum(rep["em_converged"] for rep in result["repetitions"])
        for label in labels:
            rows = [rep["rows"][label] for rep in result["repetitions"]]
            test = [row["test_log_loss"] for row in rows]
            train = [row["train_objective"] for row in rows]
            if label == "EM (converged)":
                label += f", converged in {converged}/{len(rows)} (else stopped at the cap)"
            lines.append(
                f"| {result['dataset']} | {label} | {np.mean(test):.4f} ({np.std(test):.4f}) | "
                f"{np.mean(train):.5f} ({np.std(train):.5f}) | "
                f"{' / '.join(f'{v:.4f}' for v in test)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(REAL_DATASETS))
    parser.add_argument("--experts", type=int, default=2, help="K, as in classification.py")
    parser.add_argument("--em-max-iter", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with open(os.path.join(benchmark.RESULTS_DIR, "classification.json")) as handle:
        source = json.load(handle)["results"]
    results = [run_dataset(r, args) for r in source if r["dataset"] in args.datasets]
    with open(os.path.join(benchmark.RESULTS_DIR, "classification_passes.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    text = markdown(results, args.em_max_iter)
    with open(os.path.join(benchmark.RESULTS_DIR, "classification_passes.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
