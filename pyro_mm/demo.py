"""The README's demo: fit a 2-expert Gaussian MoE from a stream of 10^5 samples with incremental
MM, compare it with Pyro SVI (Adam) on the same stream, and save a figure.

Run with ``python -m pyro_mm.demo [--output DIR] [--num-samples N] [--seed S]``.
"""

import argparse
import os
import time

import torch

from .datasets import sample_gaussian_moe
from .infer import IncrementalMM
from .metrics import parameter_error
from .models import GaussianExpertParams, GaussianMoE, MoEParams

#: The demo's true model: expert 1 (y = 2 + 1.5 x) dominates for x > 0, expert 2
#: (y = -1 - 2 x, the gate's reference) for x < 0; both with noise standard deviation 0.5.
TRUTH = MoEParams(
    gate=torch.tensor([[0.0, 2.5]], dtype=torch.float64),
    experts=GaussianExpertParams(
        weight=torch.tensor([[[2.0, 1.5]], [[-1.0, -2.0]]], dtype=torch.float64),
        variance=torch.tensor([[0.25], [0.25]], dtype=torch.float64),
    ),
)


def _fit_svi(x, y, batch_size, lr, seed):
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = GaussianMoE(2, x.shape[1], seed=seed).double()
    svi = SVI(model, lambda x, y=None: None, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    losses, seen = [], []
    start = time.perf_counter()
    for begin in range(0, len(x), batch_size):
        xb, yb = x[begin : begin + batch_size], y[begin : begin + batch_size]
        losses.append(svi.step(xb, yb) / len(xb))
        seen.append(begin + len(xb))
    model.fitted = True
    return model, losses, seen, time.perf_counter() - start


def _smooth(values, window=20):
    values = torch.tensor(values, dtype=torch.float64)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)])
    counts = torch.arange(1, len(values) + 1).clamp(max=window)
    starts = torch.arange(len(values)) + 1 - counts
    return ((cumulative[1:] - cumulative[starts]) / counts).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output", help="folder for the PNG")
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (the steps here are small: one thread avoids OpenMP "
        "waiting on a busy core, which can slow them down 10-80x)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    truth = TRUTH
    x, y = sample_gaussian_moe(truth, args.num_samples, seed=args.seed)
    print(
        f"data: {args.num_samples} samples from a 2-expert Gaussian MoE (P = 1), seed {args.seed}"
    )

    # Imported before the clock starts: the K-means initialiser's first import of scikit-learn
    # takes about a second, which is not the fit's cost.
    import sklearn.cluster  # noqa: F401

    model = GaussianMoE(num_experts=2, in_features=1)
    infer = IncrementalMM(model)
    start = time.perf_counter()
    history = infer.fit(x, y, batch_size=256, progress=False)
    mm_time = time.perf_counter() - start

    svi_model, svi_losses, svi_seen, svi_time = _fit_svi(x, y, 256, 0.01, args.seed)

    truth_model = GaussianMoE(2, 1).double()
    truth_model.set_params(truth)
    rows = [
        ("true parameters", truth_model, float("nan")),
        ("IncrementalMM (1 pass)", model, mm_time),
        ("Pyro SVI, Adam lr=0.01 (1 pass)", svi_model, svi_time),
    ]
    print(f"\n{'method':<34}{'NLL/sample':>12}{'param. error':>14}{'wall time':>12}")
    for name, fitted, seconds in rows:
        nll = -fitted.log_prob(x, y).mean().item()
        error = parameter_error(fitted.get_params(), truth)["total"]
        wall = "" if seconds != seconds else f"{seconds:.2f} s"
        print(f"{name:<34}{nll:>12.4f}{error:>14.4f}{wall:>12}")
    print("(parameter error: relative Euclidean error after aligning the experts to the truth)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(history.samples_seen, _smooth(history.loss), label="IncrementalMM")
    left.plot(svi_seen, _smooth(svi_losses), label="Pyro SVI (Adam)", alpha=0.8)
    best = -truth_model.log_prob(x, y).mean().item()
    left.axhline(best, color="k", ls="--", lw=1, label="NLL at the true parameters")
    left.set(
        xlabel="samples seen",
        ylabel="mini-batch NLL per sample (moving average of 20)",
        title="Loss trajectory",
    )
    left.set_ylim(best - 0.1, best + 1.0)
    left.legend()
    grid = torch.linspace(x.min().item(), x.max().item(), 400, dtype=torch.float64).unsqueeze(-1)
    show = slice(0, 3000)
    right.scatter(x[show, 0], y[show, 0], s=3, alpha=0.25, color="grey", label="data (3000 shown)")
    right.plot(grid[:, 0], truth_model.predict(grid)[:, 0], "k--", label="true E[y|x]")
    right.plot(grid[:, 0], model.predict(grid)[:, 0], label="IncrementalMM E[y|x]")
    right.plot(grid[:, 0], svi_model.predict(grid)[:, 0], label="SVI E[y|x]", alpha=0.8)
    right.set(xlabel="x", ylabel="y", title="Regression function E[y|x]")
    right.legend()
    fig.tight_layout()
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "demo.png")
    fig.savefig(path, dpi=120)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
