"""The weighted moment matrices behind every Gaussian-expert statistic: whole batch vs chunks.

The expert statistics ``avg tau_k r r^T``, ``avg tau_k y r^T`` and ``avg tau_k y^2`` of a
batch (:func:`pyro_mm.surrogates.gaussian_expert.gaussian_expert_statistics`, used when the gate
and the experts have different features, by the full-covariance experts and by EM's expert
M-step) used to be computed from one weighted copy ``tau_k r`` of the whole batch, ``K N D``
entries; they are now blocks of the moment matrices of ``(r, y)`` accumulated over chunks of
rows whose weighted copy fits in 1 MiB (:func:`pyro_mm.surrogates.moments.weighted_moments`).

For N in {256, 4096, 65536} rows x K in {2, 8} experts x D in {11, 51} features (P = 10, 50
inputs with an intercept), Q = 1, float64, one torch thread: the median time of the
whole-batch formula (written out below) and of the library's function, called alternately
``--calls`` times (scaled down for the larger batches), and the size of the whole-batch
weighted copy (``K N D`` x 8 bytes, arithmetic) against the chunk bound.

Run: ``python benchmarks/moment_statistics.py`` (about a minute). Writes
``benchmarks/results/moment_statistics.{json,md}``.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from pyro_mm.surrogates import moments
from pyro_mm.surrogates.gaussian_expert import gaussian_expert_statistics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def whole_batch_statistics(resp, features, y):
    """The statistics from one weighted copy of the whole batch (the formula before chunking)."""
    num_rows = resp.shape[0]
    weighted = resp.T.unsqueeze(-1) * features  # (K, N, D)
    return (
        resp.mean(0),
        weighted.mT @ features / num_rows,
        y.T @ weighted / num_rows,
        resp.T @ y.square() / num_rows,
    )


def time_case(num_rows: int, num_experts: int, num_features: int, calls: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(num_rows, num_features, generator=generator, dtype=torch.float64)
    y = torch.randn(num_rows, 1, generator=generator, dtype=torch.float64)
    logits = torch.randn(num_rows, num_experts, generator=generator, dtype=torch.float64)
    resp = torch.softmax(logits, -1)
    plain = whole_batch_statistics(resp, features, y)
    chunked = gaussian_expert_statistics(resp, features, y)
    difference = max(
        float((got - want).abs().max())
        for got, want in zip(plain, (chunked.weight, chunked.gram, chunked.cross, chunked.square))
    )
    whole, library = [], []
    for _ in range(calls):  # alternate, so that the machine's drift hits both alike
        start = time.perf_counter()
        whole_batch_statistics(resp, features, y)
        middle = time.perf_counter()
        gaussian_expert_statistics(resp, features, y)
        whole.append(middle - start)
        library.append(time.perf_counter() - middle)
    return {
        "rows": num_rows,
        "experts": num_experts,
        "features": num_features,
        "calls": calls,
        "whole_batch_ms": 1e3 * statistics.median(whole),
        "chunked_ms": 1e3 * statistics.median(library),
        "speedup": statistics.median(whole) / statistics.median(library),
        "max_abs_difference": difference,
        "whole_batch_copy_mb": num_experts * num_rows * num_features * 8 / 2**20,
    }


def report(command: str, cases: list, machine: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "Expert statistics of one batch (Q = 1, float64): median time of the whole-batch "
        "formula and of `gaussian_expert_statistics` (chunked moments), called alternately; "
        "'copy' is the whole-batch weighted copy's size (K N D x 8 bytes), against the "
        f"chunks' bound of {moments.CHUNK_BYTES / 2**20:g} MiB (at least "
        f"{moments.MIN_CHUNK_ROWS} rows).",
        "",
        "| rows | K | D | whole batch (ms) | chunked (ms) | speed-up | copy (MB) | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        lines.append(
            f"| {case['rows']} | {case['experts']} | {case['features']} | "
            f"{case['whole_batch_ms']:.3f} | {case['chunked_ms']:.3f} | {case['speedup']:.2f}x | "
            f"{case['whole_batch_copy_mb']:.1f} | {case['max_abs_difference']:.1e} |"
        )
    lines += ["", f"Machine: {machine}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls at 256 rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="moment_statistics", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = []
    for num_rows in (256, 4096, 65536):
        calls = max(10, args.calls * 256 // num_rows)
        for num_experts in (2, 8):
            for num_features in (11, 51):
                case = time_case(num_rows, num_experts, num_features, calls)
                print(
                    f"N {num_rows:6d} K {num_experts} D {num_features:2d}: whole batch "
                    f"{case['whole_batch_ms']:.3f} ms, chunked {case['chunked_ms']:.3f} ms "
                    f"({case['speedup']:.2f}x)",
                    flush=True,
                )
                cases.append(case)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )
    command = "python benchmarks/moment_statistics.py" + "".join(f" {a}" for a in sys.argv[1:])
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.out}.json"), "w") as handle:
        json.dump({"command": command, "machine": machine, "cases": cases}, handle, indent=2)
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as handle:
        handle.write(report(command, cases, machine))


if __name__ == "__main__":
    main()
