"""EM to the maximum-likelihood estimate on 10^5 samples, against R's flexmix.

Data (the same as ``benchmarks/streaming.py``): ``truth = gaussian_moe_truth(2, 10, seed=0)``
(K = 2 Gaussian experts, P = 10 inputs, linear gate and experts with intercepts, noise variance
0.25) and ``x, y = sample_gaussian_moe(truth, 100_000, seed=1)``.

Protocol:

* one start for everybody: ``kmeans_init`` (10 K-means restarts on standardised ``(x, y)``,
  experts fitted on the clusters, gate at zero); its time is reported separately;
* ``pyro_mm.EM`` from that start, until the mean NLL changes by less than ``--tol`` (1e-8) between
  two iterations (exact Newton gate M-step, closed-form expert M-step, float64); median wall time
  of ``--repeats`` (3) runs;
* when ``Rscript`` with the ``flexmix`` package is installed: ``flexmix(y ~ ., k = 2,
  model = FLXMRglm("gaussian"), concomitant = FLXPmultinom(~ x1 + ... + x10))`` (EM with a
  multinomial-logit concomitant model, i.e. the same softmax-gated MoE), started from the
  responsibilities of the same initial parameters, with its relative log-likelihood tolerance
  set to ``tol / |NLL|`` so that it stops at the same change of the mean NLL. Its time is
  measured inside R (``system.time`` around ``flexmix``, data loading excluded); its NLL is
  recomputed here at its fitted parameters. Without R the flexmix rows are skipped with a message.

Run: ``python benchmarks/em_speed.py`` (writes ``benchmarks/results/em_speed.{json,md}``).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from pyro_mm import EM, GaussianMoE
from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe
from pyro_mm.init import kmeans_init
from pyro_mm.models.params import GaussianExpertParams, MoEParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

FLEXMIX_SCRIPT = r"""
suppressPackageStartupMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(file.path(args[1], "data.csv"))
start <- as.matrix(read.csv(file.path(args[1], "start.csv")))
tolerance <- as.numeric(args[2])
inputs <- setdiff(names(data), "y")
gate <- as.formula(paste("~", paste(inputs, collapse = " + ")))
timing <- system.time(
  fit <- flexmix(y ~ ., data = data, k = ncol(start), cluster = start,
                 model = FLXMRglm(family = "gaussian"), concomitant = FLXPmultinom(gate),
                 control = list(tolerance = tolerance, iter.max = 100000, minprior = 0))
)
experts <- parameters(fit)
gate_weights <- parameters(fit, which = "concomitant")
write.csv(experts, file.path(args[1], "experts.csv"))
write.csv(gate_weights, file.path(args[1], "gate.csv"))
cat(sprintf('{"seconds": %.6f, "iterations": %d, "converged": %s, "log_lik": %.12f, "version": "%s", "r": "%s"}\n',
            timing[["elapsed"]], fit@iter, tolower(fit@converged), as.numeric(logLik(fit)),
            as.character(packageVersion("flexmix")), R.version.string))
"""


def flexmix_available() -> str:
    """``""`` when Rscript with flexmix can run, else the reason it cannot."""
    if shutil.which("Rscript") is None:
        return "Rscript is not installed (Debian: apt-get install r-base-core r-cran-flexmix)"
    check = subprocess.run(
        ["Rscript", "-e", "suppressPackageStartupMessages(library(flexmix))"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        return f"the R package flexmix is not installed: {check.stderr.strip()[:200]}"
    return ""


def run_flexmix(x, y, start_resp, tolerance, model):
    """Fits flexmix in a subprocess; returns its figures and our NLL at its parameters."""
    with tempfile.TemporaryDirectory() as folder:
        columns = [f"x{j + 1}" for j in range(x.shape[1])]
        table = np.column_stack([x.numpy(), y.numpy()[:, 0]])
        np.savetxt(
            os.path.join(folder, "data.csv"),
            table,
            delimiter=",",
            header=",".join(columns + ["y"]),
            comments="",
            fmt="%.17g",
        )
        np.savetxt(
            os.path.join(folder, "start.csv"),
            start_resp.numpy(),
            delimiter=",",
            header=",".join(f"c{k + 1}" for k in range(start_resp.shape[1])),
            comments="",
            fmt="%.17g",
        )
        script = os.path.join(folder, "fit.R")
        with open(script, "w") as handle:
            handle.write(FLEXMIX_SCRIPT)
        out = subprocess.run(
            ["Rscript", script, folder, repr(tolerance)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"flexmix failed:\n{out.stderr}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        experts = np.genfromtxt(os.path.join(folder, "experts.csv"), delimiter=",", skip_header=1)
        gate = np.genfromtxt(os.path.join(folder, "gate.csv"), delimiter=",", skip_header=1)
    # experts: rows coef.(Intercept), coef.x1.., sigma; one column per component (first = name).
    coefficients = torch.as_tensor(experts[:-1, 1:].T, dtype=torch.float64)
    sigma = torch.as_tensor(experts[-1, 1:], dtype=torch.float64)
    # concomitant: component 1 is flexmix's reference; ours is the last expert.
    logits = torch.as_tensor(gate[:, 1:].T, dtype=torch.float64)
    params = MoEParams(
        gate=(logits[:-1] - logits[-1]),
        experts=GaussianExpertParams(
            weight=coefficients.unsqueeze(1), variance=sigma.square().unsqueeze(1)
        ),
    )
    figures["nll"] = -model.log_prob(x, y, params).mean().item()
    figures["nll_reported"] = -figures["log_lik"] / len(x)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (R is single-threaded)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="EM runs (the median time is kept)")
    parser.add_argument("--no-flexmix", action="store_true", help="skip flexmix even if present")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    truth = gaussian_moe_truth(2, 10, seed=0)
    x, y = sample_gaussian_moe(truth, args.num_samples, seed=1)
    model = GaussianMoE(2, 10).double()
    truth_nll = -model.log_prob(x, y, truth).mean().item()

    begin = time.perf_counter()
    start = kmeans_init(model, x, y, seed=0)
    init_seconds = time.perf_counter() - begin
    start_resp = model.responsibilities(x, y, start)

    em_seconds = []
    for _ in range(args.repeats):
        model.set_params(start)
        em = EM(model, init="current", tol=args.tol)
        begin = time.perf_counter()
        history = em.fit(x, y, max_iter=10_000, progress=False)
        em_seconds.append(time.perf_counter() - begin)
    em_nll = em.evaluate_loss(x, y)
    rows = [
        {
            "method": "pyro_mm.EM",
            "iterations": em.num_iterations,
            "converged": em.converged,
            "seconds": float(np.median(em_seconds)),
            "seconds_of_each_repeat": em_seconds,
            "nll": em_nll,
            "last_change": abs(history.loss[-1] - history.loss[-2]),
        }
    ]

    flexmix_note = "--no-flexmix given" if args.no_flexmix else flexmix_available()
    if not flexmix_note:
        tolerance = args.tol / abs(em_nll)
        figures = run_flexmix(x, y, start_resp, tolerance, GaussianMoE(2, 10).double())
        rows.append(
            {
                "method": f"flexmix {figures['version']} (R)",
                "iterations": figures["iterations"],
                "converged": figures["converged"],
                "seconds": figures["seconds"],
                "nll": figures["nll"],
                "nll_reported": figures["nll_reported"],
                "relative_tolerance": tolerance,
                "r_version": figures["r"],
            }
        )
    else:
        print(f"flexmix skipped: {flexmix_note}")

    result = {
        "command": "python " + " ".join(sys.argv),
        "num_samples": args.num_samples,
        "tol": args.tol,
        "torch_threads": args.threads,
        "kmeans_init_seconds": init_seconds,
        "truth_nll": truth_nll,
        "rows": rows,
        "flexmix_skipped": flexmix_note or None,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}",
        # Other processes share the machine: the load average says how much (both timings suffer).
        "load_average_1_5_15_min": list(os.getloadavg()),
    }
    if len(rows) == 2:
        result["speedup"] = rows[1]["seconds"] / rows[0]["seconds"]
        result["nll_difference"] = rows[1]["nll"] - rows[0]["nll"]

    lines = [
        f"Command: `{result['command']}`",
        "",
        f"EM to the MLE: K=2, P=10, N={args.num_samples}, stop when the mean NLL changes by "
        f"< {args.tol:g}; common K-means start ({init_seconds:.2f} s, not included below); "
        f"NLL at the truth {truth_nll:.8f}.",
        "",
        "| method | iterations | converged | wall time (s) | final mean NLL | NLL it reports |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        reported = row.get("nll_reported", row["nll"])
        lines.append(
            f"| {row['method']} | {row['iterations']} | {row['converged']} | "
            f"{row['seconds']:.3f} | {row['nll']:.10f} | {reported:.10f} |"
        )
    lines.append("")
    if "speedup" in result:
        lines.append(
            f"EM is {result['speedup']:.1f}x faster than flexmix; NLL difference "
            f"(flexmix - EM) {result['nll_difference']:.2e}."
        )
    else:
        lines.append(f"flexmix skipped: {flexmix_note}")
    load = ", ".join(f"{value:.1f}" for value in result["load_average_1_5_15_min"])
    lines.append(
        f"Machine: {result['machine']}, torch threads {args.threads}; load average at the end "
        f"(1/5/15 min): {load}."
    )
    table = "\n".join(lines) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "em_speed.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(RESULTS, "em_speed.md"), "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
