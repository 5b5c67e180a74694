"""Makes ``docs/ppc.png``: posterior-predictive checks of one- and two-expert fits.

Data: 1000 rows from a seeded two-expert linear Gaussian MoE with one input. Each model is
fitted by incremental MM, its posterior approximated by Laplace, and checked with
``az.plot_ppc``; ``az.compare`` is printed. Run from the repository root::

    python docs/make_ppc_figure.py
"""

import pathlib
import warnings

import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from pyro_mm import GaussianMoE, IncrementalMM  # noqa: E402
from pyro_mm.datasets.synthetic import gaussian_moe_truth, sample_gaussian_moe  # noqa: E402
from pyro_mm.diagnostics import laplace_posterior, to_inference_data  # noqa: E402

OUTPUT = pathlib.Path(__file__).with_name("ppc.png")


def main() -> None:
    truth = gaussian_moe_truth(num_experts=2, in_features=1, seed=11)
    x, y = sample_gaussian_moe(truth, 1000, seed=12)
    idatas = {}
    for num_experts in (1, 2):
        model = GaussianMoE(num_experts, in_features=1)
        IncrementalMM(model).fit(x, y, batch_size=100, epochs=30, progress=False)
        posterior = laplace_posterior(model, x, y)
        idatas[f"K = {num_experts}"] = to_inference_data(model, x, y, posterior, seed=0)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (name, idata) in zip(axes, idatas.items(), strict=True):
        az.plot_ppc(idata, ax=ax, num_pp_samples=100, random_seed=0)
        ax.set_title(f"{name} experts, Laplace posterior after incremental MM")
        ax.legend(loc="upper left", fontsize="small", frameon=False)
    figure.tight_layout()
    figure.savefig(OUTPUT, dpi=110)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        print(az.compare(idatas)[["rank", "elpd_loo", "p_loo", "elpd_diff", "dse"]])
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
