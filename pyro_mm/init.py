"""Warm starts for the MM and EM iterations.

* :func:`kmeans_init`: the paper's default: K-means (scikit-learn, several restarts, lowest
  distortion) on a first batch of standardised ``(x, y)``, experts fitted on their clusters
  (least squares, or one MM step from zero coefficients for multinomial experts),
  gate at zero or, with ``gate="logistic"``, a multinomial logistic regression of the cluster
  labels on the gate features (the paper's "Incremental MM*"; for another gate kind, its block's
  fit to the labels, e.g. one regression per level of a hierarchical gate).
"""

import dataclasses

import numpy as np
import torch

from .models.base import MixtureOfExperts
from .models.params import tree_leaves, tree_map, tree_to
from .surrogates.registry import expert_surrogate_for, gate_surrogate_for

__all__ = ["INITS", "check_init", "initial_params", "kmeans_init", "check_enough_rows"]

#: The starting points every fitting method accepts as ``init=``.
INITS = ("auto", "kmeans", "kmeans-logistic", "spectral", "current")


def check_init(init: str) -> str:
    """Returns ``init`` when it names a starting point of :data:`INITS`, else raises."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


def initial_params(
    model, x, y, init: str = "auto", *, seed: int = 0, expert_surrogate=None, centring=None
):
    """The starting point ``theta_0`` of a fit, from a first batch ``(x, y)``.

    * ``"auto"``: ``"current"`` if the model already holds fitted parameters, else ``"kmeans"``;
    * ``"current"``: the model's parameters;
    * ``"kmeans"`` / ``"kmeans-logistic"``: :func:`kmeans_init` with the gate at zero / from a
      logistic regression of the cluster labels (the paper's "Incremental MM*");
    * ``"spectral"``: :func:`pyro_mm.spectral.spectral_init` (Gaussian experts with one output
      and linear features; the noise level is estimated).

    :param centring: a :class:`~pyro_mm.infer.centring.FeatureCentring` of the regressors, for
        the K-means starts' solves (see :func:`kmeans_init`).
    :returns: :class:`~pyro_mm.models.params.MoEParams` in ``x``'s dtype, in the model's
        coordinates.
    """
    check_init(init)
    if init == "auto":
        init = "current" if model.fitted else "kmeans"
    if init == "current":
        return tree_to(model.get_params(), x.dtype)
    if init == "spectral":
        from .spectral import spectral_init

        return tree_to(spectral_init(model, x, y, seed=seed), x.dtype)
    check_enough_rows(model, x.shape[0])
    gate = "logistic" if init == "kmeans-logistic" else "zero"
    return kmeans_init(
        model, x, y, gate=gate, seed=seed, expert_surrogate=expert_surrogate, centring=centring
    )


def check_enough_rows(model: MixtureOfExperts, num_rows: int) -> None:
    """Raises when a first batch has fewer rows than there are experts to initialise."""
    if num_rows < model.num_experts:
        raise ValueError(
            f"K = {model.num_experts} experts need at least {model.num_experts} samples in the "
            f"first batch for K-means initialisation, got {num_rows}; pass a larger first batch "
            f"or initialise explicitly (init='current' after setting the model's parameters)"
        )


def kmeans_init(
    model: MixtureOfExperts,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gate: str = "zero",
    n_init: int = 10,
    seed: int = 0,
    expert_surrogate=None,
    centring=None,
):
    """Initial parameters from K-means clusters of standardised ``(x, y)``.

    :param MixtureOfExperts model: the model (its current parameters are the fallback for an
        empty cluster).
    :param torch.Tensor x: validated inputs ``(N, P)``.
    :param torch.Tensor y: validated outputs.
    :param str gate: ``"zero"`` (uniform gate) or ``"logistic"`` (logistic regression of the
        cluster labels).
    :param int n_init: K-means restarts; the lowest-distortion run is kept.
    :param int seed: K-means seed.
    :param expert_surrogate: the model's expert block (built with defaults if omitted).
    :param centring: a :class:`~pyro_mm.infer.centring.FeatureCentring` of the regressors: the
        experts' and the logistic gate's fits are then solved on the centred regressors (well
        conditioned for inputs far from zero) and mapped back (``None``: on the regressors as
        they are).
    :returns: :class:`~pyro_mm.models.params.MoEParams` in the model's coordinates.
    """
    from sklearn.cluster import KMeans

    check_enough_rows(model, x.shape[0])
    if gate not in ("zero", "logistic"):
        raise ValueError(f"gate initialisation must be 'zero' or 'logistic', got {gate!r}")
    num_experts = model.num_experts
    data = torch.cat([x, model.clustering_view(y)], dim=-1).double().numpy()
    scale = data.std(0)
    data = (data - data.mean(0)) / np.where(scale > 0, scale, 1.0)
    labels = KMeans(num_experts, n_init=n_init, random_state=seed).fit_predict(data)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    resp = torch.nn.functional.one_hot(labels, num_experts).to(x.dtype)
    current = tree_to(model.get_params(), x.dtype)
    surrogate = expert_surrogate if expert_surrogate is not None else expert_surrogate_for(model)
    u, r = model.features(x)
    if centring is not None:
        # At x + 10^6 the uncentred least squares lost enough digits that 40 EM steps from
        # this start ended 3e-6 nats per sample away from the same steps from x's start.
        current = centring.centred_params(current, model)
        u, r = centring.features(u, r)
        y = centring.centred_outputs(y)
    # The statistics are taken at zero coefficients, not at the model's random ones: for
    # experts fitted by one MM step (multinomial) the step from zero is a least-squares fit of
    # the labels, which is the same fit whatever the inputs' scale, whereas from random weights
    # on raw inputs (scales of 10^3) it started from saturated logits: IncrementalMM ended at a
    # mean NLL of 6.06 on wine and EM at 55.9 on breast cancer (0.062 and 0.0002 standardised).
    # Least-squares experts' statistics do not depend on it.
    anchor = dataclasses.replace(current.experts, weight=torch.zeros_like(current.experts.weight))
    statistics = surrogate.statistics(anchor, r, y, resp)
    if not all(bool(torch.isfinite(leaf).all()) for leaf in tree_leaves(statistics)):
        # The solves' factorisations fail on them with torch's LinAlgError (multinomial and
        # full-covariance experts), which would not say what is wrong with the data.
        raise ValueError(
            "the K-means start's expert statistics overflow the model's dtype: the batch's inputs "
            "or outputs are too large (their products exceed its range); standardise the data"
        )
    experts, _ = surrogate.solve(statistics, current.experts)
    gate_params = tree_map(torch.zeros_like, current.gate)
    if gate == "logistic" and num_experts > 1:
        fitted = gate_surrogate_for(model).from_labels(u, labels, num_experts, seed)
        gate_params = tree_to(fitted, x.dtype)
    params = type(current)(gate=gate_params, experts=experts)
    return params if centring is None else centring.model_params(params, model)
