r"""Choosing the number of experts ``K``: BIC and PSIS-LOO over a range of ``K``.

For every candidate ``K`` a model is built and fitted (EM to convergence from K-means by
default), then scored by

* **BIC** ``= 2 NLL + d log N`` (``NLL`` the full-data negative log-likelihood, ``d`` the number
  of free parameters: ``(K - 1) D_g`` gate weights plus the experts' parameters, a covariance
  matrix counting ``Q (Q + 1) / 2``); lower is better. BIC is consistent for the number of
  components of regular models; mixtures are not regular when ``K`` is over-specified, but BIC
  remains the standard, usually consistent choice (Keribin, 2000).
* **PSIS-LOO** (Vehtari, Gelman & Gabry, 2017): the expected log predictive density estimated by
  Pareto-smoothed importance sampling over a :func:`~pyro_mm.diagnostics.laplace_posterior`
  of the fit, through :func:`~pyro_mm.diagnostics.to_inference_data` and ``arviz.loo``; higher
  is better. Its standard error and the Pareto shapes ``k`` come with it (unreliable above
  :func:`pareto_k_threshold`: 0.63 for the default 500 draws, 0.7 from about 2,200; such ``K``
  are named in a warning); differences within a couple of standard errors do not discriminate.
"""

import dataclasses
import math
import warnings

import torch
from torch.distributions import constraints

from ..models.base import MixtureOfExperts
from .inference_data import to_inference_data
from .laplace import laplace_posterior

__all__ = ["KSelection", "choose_num_experts", "num_free_parameters", "pareto_k_threshold"]

_CRITERIA = ("bic", "loo")


def pareto_k_threshold(num_samples: int) -> float:
    """The Pareto shape above which a PSIS-LOO estimate from ``num_samples`` draws is
    unreliable: ``min(1 - 1 / log10(S), 0.7)`` (Vehtari et al., 2024, "Pareto smoothed importance
    sampling", the threshold ``arviz.loo`` warns at)."""
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def num_free_parameters(model: MixtureOfExperts) -> int:
    """The number of free parameters ``d`` of ``model`` (for BIC).

    Every parameter counts its entries, except a positive definite matrix, which counts its
    ``Q (Q + 1) / 2`` distinct entries.
    """
    count = 0
    for value, constraint in model._constrained_params().values():
        while isinstance(constraint, constraints.independent):
            constraint = constraint.base_constraint
        if constraint is constraints.positive_definite:
            size = value.shape[-1]
            count += value[..., 0, 0].numel() * size * (size + 1) // 2
        else:
            count += value.numel()
    return count


@dataclasses.dataclass
class KSelection:
    """The outcome of :func:`choose_num_experts`.

    :ivar list table: one dict per candidate ``K``: ``num_experts``, ``nll`` (full data),
        ``num_parameters``, and per criterion ``bic``; ``elpd_loo``, ``elpd_loo_se``, ``p_loo``,
        ``max_pareto_k``; ``warnings`` (messages raised while fitting and scoring that ``K``;
        :func:`choose_num_experts` names in one ``RuntimeWarning`` the ``K`` that have any, and
        those whose ``max_pareto_k`` exceeds :func:`pareto_k_threshold`).
    :ivar int best_bic: the ``K`` of lowest BIC (``None`` when not computed).
    :ivar int best_loo: the ``K`` of highest ``elpd_loo`` (``None`` when not computed).
    :ivar dict models: ``K -> fitted model``.
    :ivar dict inference_data: ``K -> arviz.InferenceData`` (for ``arviz.compare``).
    """

    table: list
    best_bic: int
    best_loo: int
    models: dict
    inference_data: dict

    def compare(self):
        """``arviz.compare`` of the candidates' PSIS-LOO (a pandas DataFrame)."""
        import arviz

        return arviz.compare({f"K={k}": idata for k, idata in self.inference_data.items()})


def _fit_with_em(model, x, y, seed):
    from ..infer.em import EM

    EM(model, seed=seed).fit(x, y, max_iter=1000, progress=False)


def choose_num_experts(
    make_model,
    x,
    y,
    candidates,
    *,
    fit=None,
    criteria=_CRITERIA,
    num_samples: int = 500,
    seed: int = 0,
) -> KSelection:
    """Fits a model for every ``K`` in ``candidates`` and scores it by BIC and PSIS-LOO.

    Example::

        selection = choose_num_experts(lambda k: GaussianMoE(k, 3), x, y, range(1, 6))
        selection.best_bic, selection.best_loo, selection.compare()

    :param make_model: ``K -> MixtureOfExperts`` (a fresh, unfitted model).
    :param x: inputs ``(N, P)`` (all the data: both criteria use the full data set).
    :param y: outputs.
    :param candidates: the numbers of experts to try (positive integers).
    :param fit: ``(model, x, y) -> None`` fitting the model in place (default: ``EM`` to
        convergence from K-means seeded by ``seed``, at most 1000 iterations).
    :param criteria: a subset of ``("bic", "loo")``.
    :param int num_samples: posterior draws for PSIS-LOO.
    :param int seed: seed of the default fit and of the posterior draws.
    :returns: a :class:`KSelection`.
    :raises ValueError: for bad candidates or criteria, before anything is fitted.
    """
    candidates = list(candidates)
    if not candidates or any(isinstance(k, bool) or int(k) != k or k < 1 for k in candidates):
        raise ValueError(f"candidates must be positive integers, got {candidates!r}")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates must be distinct, got {candidates!r}")
    criteria = tuple(criteria)
    unknown = sorted(set(criteria) - set(_CRITERIA))
    if unknown or not criteria:
        raise ValueError(f"criteria must be a non-empty subset of {_CRITERIA}, got {criteria!r}")
    table, models, inference_data = [], {}, {}
    for num_experts in (int(k) for k in candidates):
        model = make_model(num_experts)
        if not isinstance(model, MixtureOfExperts) or model.num_experts != num_experts:
            raise TypeError(
                f"make_model({num_experts}) must return a pyro_mm mixture of experts with "
                f"{num_experts} experts, got {model!r}"
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if fit is None:
                _fit_with_em(model, x, y, seed)
            else:
                fit(model, x, y)
            row = _score(model, x, y, criteria, num_samples, seed, num_experts, inference_data)
        row["warnings"] = sorted({str(w.message) for w in caught})
        table.append(row)
        models[num_experts] = model
    best_bic = min(table, key=lambda r: r["bic"])["num_experts"] if "bic" in criteria else None
    best_loo = max(table, key=lambda r: r["elpd_loo"])["num_experts"] if "loo" in criteria else None
    _warn_about_candidates(table, pareto_k_threshold(num_samples))
    return KSelection(table, best_bic, best_loo, models, inference_data)


def _warn_about_candidates(table, threshold: float) -> None:
    """One warning naming the candidates whose PSIS-LOO is unreliable and those whose fitting
    or scoring warned: those messages are kept in the table, where a user who reads only
    ``best_loo`` would not see them (quasi-separable classes, for one, give a flat Hessian, a
    Laplace posterior of huge variance and Pareto shapes of 20 and more)."""
    unreliable = [
        f"K = {row['num_experts']} (max Pareto k {row['max_pareto_k']:.2g})"
        for row in table
        if row.get("max_pareto_k", 0.0) > threshold
    ]
    warned = [str(row["num_experts"]) for row in table if row["warnings"]]
    parts = []
    if unreliable:
        parts.append(
            f"PSIS-LOO is unreliable (Pareto k above {threshold:.2g}) for "
            f"{', '.join(unreliable)}: do not choose K by its elpd_loo; use BIC or K-fold "
            f"cross-validation"
        )
    if warned:
        parts.append(
            f"fitting or scoring K = {', '.join(warned)} raised warnings, kept in "
            f"KSelection.table[i]['warnings']"
        )
    if parts:
        warnings.warn("choose_num_experts: " + "; ".join(parts), RuntimeWarning, stacklevel=3)


def _score(model, x, y, criteria, num_samples, seed, num_experts, inference_data) -> dict:
    x = model.check_x(x)
    y = model.check_y(y, x.shape[0])
    with torch.no_grad():
        nll = -model.log_prob(x, y).sum().item()
    num_parameters = num_free_parameters(model)
    row = {"num_experts": num_experts, "nll": nll, "num_parameters": num_parameters}
    if "bic" in criteria:
        row["bic"] = 2 * nll + num_parameters * math.log(x.shape[0])
    if "loo" in criteria:
        import arviz

        posterior = laplace_posterior(model, x, y)
        idata = to_inference_data(model, x, y, posterior, num_samples=num_samples, seed=seed)
        loo = arviz.loo(idata, pointwise=True)
        row.update(
            elpd_loo=float(loo.elpd_loo),
            elpd_loo_se=float(loo.se),
            p_loo=float(loo.p_loo),
            max_pareto_k=float(loo.pareto_k.max()),
        )
        inference_data[num_experts] = idata
    return row
