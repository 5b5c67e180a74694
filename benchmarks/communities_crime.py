"""Communities and Crime: the incremental-MM paper's Table 7 protocol (Section 5.4.2).

Protocol, per fold of a 5-fold cross-validation of the 1,994 communities:

* target ``ViolentCrimesPerPop``; the inputs are ten attributes chosen by Lasso (scikit-learn
  ``LassoCV`` + ``SelectFromModel``, the ten largest ``|coef|``) fitted on the TRAINING folds
  only, so the test fold never influences the choice (printed for every fold);
* the training fold is shuffled (seeded), written to a temporary CSV file and read back through
  :class:`pyro_mm.datasets.CsvBatchStream`: every method is trained from that stream;
* a softmax-gated Gaussian MoE with ``K`` experts, gate degree ``D_W = 1`` and expert degree
  ``D_V`` in {1, 2}, initialised by K-means (gate at zero, or a logistic regression of the
  K-means labels: "Incremental MM*");
* metrics on the test fold: MSE, MAPE, NRMSE (RMSE / range of the test targets) of
  ``E[y | x]`` against ``y``, and the held-out mean negative log-likelihood; mean (sd) over folds.

Run ``python benchmarks/communities_crime.py --help`` for the options.
"""

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List

import numpy as np
import pandas as pd
import torch

from pyro_mm import GaussianMoE, IncrementalMM, PowerDecay, metrics
from pyro_mm.datasets import COMMUNITIES_CRIME_TARGET, CsvBatchStream, load_communities_crime

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: Table 7 of the paper: mean (sd) over its five folds, ``None`` where the paper has no row.
PAPER_TABLE_7 = {
    "Incremental MM^2": {"mse": (0.0321, 0.004), "mape": (0.9537, 0.116), "nrmse": (0.1307, 0.016)},
    "Incremental MM^1": {"mse": (0.0283, 0.003), "mape": (1.0440, 1.083), "nrmse": (0.1461, 0.012)},
    "Incremental MM*": {"mse": (0.0316, 0.010), "mape": (0.9500, 0.229), "nrmse": (0.1594, 0.010)},
    "SGD": {"mse": (0.0462, 0.012), "mape": (1.8288, 0.231), "nrmse": (0.1591, 0.010)},
    "Adam": {"mse": (0.0314, 0.005), "mape": (2.2066, 0.914), "nrmse": (0.1413, 0.007)},
    "AdamW": {"mse": (0.0315, 0.004), "mape": (1.5257, 0.507), "nrmse": (0.1417, 0.006)},
    "RMSProp": {"mse": (0.0322, 0.005), "mape": (2.126, 1.184), "nrmse": (0.1415, 0.006)},
    "Sophia": {"mse": (0.0309, 0.005), "mape": (1.9419, 1.059), "nrmse": (0.1430, 0.007)},
}
PAPER_BEST_MSE = 0.0283
METRICS = ("mse", "mape", "nrmse", "nll")


@dataclasses.dataclass
class Fold:
    """One cross-validation fold, its training data available as a CSV stream.

    :ivar int index: fold number.
    :ivar str train_csv: the shuffled training fold (selected features + target), as CSV.
    :ivar str tune_csv: the first ``1 - validation_fraction`` of ``train_csv`` (lr tuning fits).
    :ivar features: names of the ten selected attributes.
    :ivar x_validation: the rest of the training fold (lr tuning scores), ``(n_val, 10)``.
    :ivar x_test: the held-out fold, ``(n_test, 10)``.
    """

    index: int
    train_csv: str
    tune_csv: str
    features: tuple
    x_validation: torch.Tensor
    y_validation: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def stream(self, batch_size: int, tuning: bool = False) -> CsvBatchStream:
        path = self.tune_csv if tuning else self.train_csv
        return CsvBatchStream(path, COMMUNITIES_CRIME_TARGET, self.features, batch_size=batch_size)

    def whole(self, tuning: bool = False):
        """The training (or tuning) fold read whole through the stream (for batch methods)."""
        batches = list(self.stream(4096, tuning))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@dataclasses.dataclass
class Method:
    """A row of the table: ``fit(model, fold, tuning) -> dict`` trains ``model`` in place.

    ``fit`` returns extra facts to record (e.g. the tuned learning rate); ``tuning=True`` asks
    it to train on the tuning part of the fold only.
    """

    name: str
    expert_degree: int
    fit: Callable
    paper_row: str = None


def select_features(x: np.ndarray, y: np.ndarray, num_features: int, seed: int) -> np.ndarray:
    """Indices of the ``num_features`` attributes with the largest ``|coef|`` of a cross-validated
    Lasso fitted on ``(x, y)`` (which must be training data only)."""
    from sklearn.feature_selection import SelectFromModel
    from sklearn.linear_model import LassoCV

    lasso = LassoCV(cv=5, random_state=seed, max_iter=50_000, tol=1e-6)
    selector = SelectFromModel(lasso, max_features=num_features, threshold=-np.inf)
    return selector.fit(x, y).get_support(indices=True)


def write_csv(path: str, x: torch.Tensor, y: torch.Tensor, features) -> None:
    frame = pd.DataFrame(x.numpy(), columns=list(features))
    frame[COMMUNITIES_CRIME_TARGET] = y.numpy()
    # 17 significant digits: the streamed floats are bit-identical to the tensors.
    frame.to_csv(path, index=False, float_format="%.17g")


def make_folds(args, workdir: str) -> List[Fold]:
    from sklearn.model_selection import KFold

    x, y, names = load_communities_crime()
    splitter = KFold(args.folds, shuffle=True, random_state=args.seed)
    folds = []
    for index, (train, test) in enumerate(splitter.split(x.numpy())):
        selected = select_features(x[train].numpy(), y[train].numpy(), 10, args.seed)
        features = tuple(names[i] for i in selected)
        print(
            f"fold {index}: Lasso selected {list(features)} on the {len(train)} training rows "
            f"only (the {len(test)} test rows were not used: no leakage)",
            flush=True,
        )
        generator = torch.Generator().manual_seed(args.seed * 1000 + index)
        order = torch.as_tensor(train)[torch.randperm(len(train), generator=generator)]
        x_train, y_train = x[order][:, selected], y[order]
        num_tune = int(round(len(train) * (1 - args.validation_fraction)))
        train_csv = os.path.join(workdir, f"fold{index}_train.csv")
        tune_csv = os.path.join(workdir, f"fold{index}_tune.csv")
        write_csv(train_csv, x_train, y_train, features)
        write_csv(tune_csv, x_train[:num_tune], y_train[:num_tune], features)
        folds.append(
            Fold(
                index=index,
                train_csv=train_csv,
                tune_csv=tune_csv,
                features=features,
                x_validation=x_train[num_tune:],
                y_validation=y_train[num_tune:],
                x_test=x[test][:, selected],
                y_test=y[test],
            )
        )
    return folds


def test_metrics(model, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """MSE, MAPE (over the non-zero targets: a zero target has no percentage error), NRMSE and
    the mean NLL on held-out data."""
    with torch.no_grad():
        prediction = model.predict(x)[:, 0]
    nonzero = y != 0
    return {
        "mse": metrics.mse(prediction, y),
        "mape": metrics.mape(prediction[nonzero], y[nonzero]),
        "nrmse": metrics.nrmse(prediction, y),
        "nll": metrics.mean_nll(model, x, y),
    }


# ------------------------------------------------------------------------------ methods
def incremental_mm(args, init: str) -> Callable:
    """Incremental MM from the CSV stream: K-means (and the gate per ``init``) on the first
    ``--init-rows`` rows, then ``--epochs`` passes with batches of ``--mm-batch-size`` rows
    (1 is the paper's Algorithm 2) and ``gamma_n = n^{-0.6}``."""

    def fit(model, fold: Fold, tuning: bool = False) -> dict:
        infer = IncrementalMM(
            model, init=init, schedule=PowerDecay(1.0, 0.6), seed=args.seed + fold.index
        )
        infer.initialize(*next(iter(fold.stream(args.init_rows, tuning))))
        infer.fit(fold.stream(args.mm_batch_size, tuning), epochs=args.epochs, progress=False)
        return {"steps": infer.num_steps, "regularisation": dict(infer.regularisation)}

    return fit


def build_methods(args) -> List[Method]:
    methods = []
    for degree in args.expert_degrees:
        methods.append(
            Method(
                f"Incremental MM (D_V={degree})",
                degree,
                incremental_mm(args, "kmeans"),
                f"Incremental MM^{degree}",
            )
        )
        methods.append(
            Method(
                f"Incremental MM* (D_V={degree})",
                degree,
                incremental_mm(args, "kmeans-logistic"),
                "Incremental MM*" if degree == 1 else None,
            )
        )
    if args.methods:
        methods = [m for m in methods if any(key in m.name for key in args.methods)]
    return methods


# ------------------------------------------------------------------------------ running
def run_method(method: Method, fold: Fold, args) -> dict:
    model = GaussianMoE(
        args.experts, len(fold.features), 1, gate_degree=1, expert_degree=method.expert_degree
    ).double()
    start = time.perf_counter()
    info = method.fit(model, fold)
    wall_time = time.perf_counter() - start
    scores = test_metrics(model, fold.x_test, fold.y_test)
    return {"fold": fold.index, **scores, "wall_time": wall_time, **info}


def summarise(rows: List[dict]) -> dict:
    summary = {}
    for key in (*METRICS, "wall_time"):
        values = np.array([row[key] for row in rows], dtype=float)
        summary[key] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        }
    return summary


def cell(stats: dict, digits: int = 4) -> str:
    return f"{stats['mean']:.{digits}f} ({stats['sd']:.{digits - 1}f})"


def paper_cell(row: str, metric: str) -> str:
    if row is None or row not in PAPER_TABLE_7:
        return "-"
    mean, sd = PAPER_TABLE_7[row][metric]
    return f"{mean:.4f} ({sd:.3f})"


def markdown_table(results: List[dict]) -> str:
    lines = [
        "| Model | MSE | paper MSE | MAPE | paper MAPE | NRMSE | paper NRMSE | held-out NLL "
        "| wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        summary, row = result["summary"], result["paper_row"]
        lines.append(
            f"| {result['method']} | {cell(summary['mse'])} | {paper_cell(row, 'mse')} "
            f"| {cell(summary['mape'])} | {paper_cell(row, 'mape')} | {cell(summary['nrmse'])} "
            f"| {paper_cell(row, 'nrmse')} | {cell(summary['nll'])} "
            f"| {cell(summary['wall_time'], 2)} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--experts", type=int, default=2, help="number of experts K")
    parser.add_argument("--expert-degrees", type=int, nargs="+", default=[1, 2], help="D_V values")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training stream")
    parser.add_argument("--init-rows", type=int, default=200, help="rows of the K-means batch")
    parser.add_argument("--mm-batch-size", type=int, default=1, help="incremental MM batch rows")
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.2,
        help="share of each training fold held out to tune learning rates",
    )
    parser.add_argument("--methods", nargs="*", help="run only methods whose name contains one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="communities_crime", help="results file stem")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/communities_crime.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    methods = build_methods(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="communities_crime_") as workdir:
        folds = make_folds(args, workdir)
        for method in methods:
            rows = []
            for fold in folds:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    row = run_method(method, fold, args)
                row["warnings"] = sorted({str(w.message) for w in caught})
                rows.append(row)
                print(
                    f"{method.name:36s} fold {fold.index}: MSE {row['mse']:.4f} "
                    f"NLL {row['nll']:.4f} ({row['wall_time']:.1f} s)",
                    flush=True,
                )
            results.append(
                {
                    "method": method.name,
                    "expert_degree": method.expert_degree,
                    "paper_row": method.paper_row,
                    "summary": summarise(rows),
                    "folds": rows,
                }
            )
        selected = {fold.index: list(fold.features) for fold in folds}
    table = markdown_table(results)
    print(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = {
        "command": command,
        "config": vars(args),
        "selected_features": selected,
        "paper_table_7": PAPER_TABLE_7,
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }
    with open(os.path.join(RESULTS_DIR, f"{args.out}.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    with open(os.path.join(RESULTS_DIR, f"{args.out}.md"), "w") as handle:
        handle.write(f"Command: `{command}`\n\n{table}\n")
    return payload


if __name__ == "__main__":
    main()
