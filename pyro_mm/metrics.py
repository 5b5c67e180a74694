"""Error metrics of the paper's experiments and permutation-aligned parameter errors.

Estimation error compares ``E[y|x]`` under the fitted parameters with ``E[y|x]`` under the
truth; prediction error compares it with held-out ``y``. NRMSE is the RMSE divided by the range
of the reference values (the normalisation that matches the paper's tables).
"""

import dataclasses

import torch

from .metrics_voronoi import voronoi_loss
from .models.params import MoEParams, tree_leaves, tree_map
from .validation import as_tensor, class_labels

__all__ = [
    "mse",
    "mape",
    "nrmse",
    "mean_nll",
    "align_experts",
    "parameter_error",
    "regression_errors",
    "classification_errors",
    "evaluate_fit",
    "voronoi_loss",
]


def _pair(prediction, target):
    prediction = as_tensor("prediction", prediction, allow_integer=True).double()
    target = as_tensor("target", target, allow_integer=True).double()
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    return prediction, target


def mse(prediction, target) -> float:
    """Mean squared error."""
    prediction, target = _pair(prediction, target)
    return (prediction - target).square().mean().item()


def mape(prediction, target) -> float:
    """Mean absolute percentage error ``mean |pred - target| / |target|`` (as a fraction)."""
    prediction, target = _pair(prediction, target)
    return ((prediction - target).abs() / target.abs().clamp_min(1e-12)).mean().item()


def nrmse(prediction, target) -> float:
    """RMSE divided by the range ``max(target) - min(target)``."""
    prediction, target = _pair(prediction, target)
    spread = (target.max() - target.min()).clamp_min(1e-12)
    return ((prediction - target).square().mean().sqrt() / spread).item()


def mean_nll(model, x, y, params: MoEParams = None) -> float:
    """Mean negative log-likelihood of ``(x, y)`` under ``model`` (at ``params`` if given)."""
    with torch.no_grad():
        return -model.log_prob(x, y, params).mean().item()


def _permute(params: MoEParams, order) -> MoEParams:
    """Relabels experts by ``order`` and re-references the gate to the new last expert."""
    order = torch.as_tensor(order)
    full_gate = torch.nn.functional.pad(params.gate, (0, 0, 0, 1))[order]
    return MoEParams(
        gate=full_gate[:-1] - full_gate[-1], experts=tree_map(lambda t: t[order], params.experts)
    )


def _expert_vector(params: MoEParams) -> torch.Tensor:
    leaves = [t.reshape(t.shape[0], -1).to(torch.float64) for t in tree_leaves(params.experts)]
    return torch.cat(leaves, dim=-1)


def _check_comparable(estimate: MoEParams, truth: MoEParams) -> None:
    """Raises ``ValueError`` unless both are parameters of one expert family with the same
    number of experts and the same shapes: otherwise a matching, and so a relative error, would
    compare unrelated numbers (or fail in a distance of unequal vectors)."""
    if type(estimate.experts) is not type(truth.experts):
        raise ValueError(
            f"the estimate has {type(estimate.experts).__name__} experts and the truth "
            f"{type(truth.experts).__name__}: compare fits of one expert family"
        )
    shapes = [
        (tuple(e.shape), tuple(t.shape))
        for e, t in zip(
            [estimate.gate, *tree_leaves(estimate.experts)],
            [truth.gate, *tree_leaves(truth.experts)],
            strict=True,
        )
    ]
    if any(e != t for e, t in shapes):
        raise ValueError(
            f"the estimate's parameter shapes {[e for e, _ in shapes]} differ from the truth's "
            f"{[t for _, t in shapes]} (numbers of experts or features): aligning experts needs "
            "the same; pyro_mm.metrics_voronoi.voronoi_loss compares different numbers of experts"
        )


def align_experts(estimate: MoEParams, truth: MoEParams) -> MoEParams:
    """The relabelling of ``estimate``'s experts closest to ``truth``.

    The cost of matching fitted expert ``i`` to true expert ``j`` is the squared Euclidean
    distance of their stacked expert parameters plus that of their centred full gate rows
    (centring makes the gate rows independent of which expert is the reference), so the best
    relabelling is a linear assignment problem, solved exactly by the Hungarian method.
    """
    from scipy.optimize import linear_sum_assignment

    for params in (estimate, truth):
        if not isinstance(params.gate, torch.Tensor):
            raise TypeError(
                f"aligning experts needs one-level gate weights (a tensor), got a "
                f"{type(params.gate).__name__}: relabelling a structured gate (e.g. hierarchical) "
                f"must keep its groups; compare such fits by their densities or "
                f"pyro_mm.metrics.voronoi_loss instead"
            )

    _check_comparable(estimate, truth)

    def centred_gate(params):
        full = torch.nn.functional.pad(params.gate.to(torch.float64), (0, 0, 0, 1))
        return full - full.mean(0)

    cost = torch.cdist(_expert_vector(truth), _expert_vector(estimate)).square()
    cost = cost + torch.cdist(centred_gate(truth), centred_gate(estimate)).square()
    return _permute(estimate, linear_sum_assignment(cost.numpy())[1].tolist())


def parameter_error(estimate: MoEParams, truth: MoEParams) -> dict:
    """Relative errors ``||est - truth|| / ||truth||`` per parameter block, after alignment.

    :returns: ``{"gate": ..., "<expert field>": ..., "total": ...}`` (floats).
    """
    aligned = align_experts(estimate, truth)
    errors = {}
    pairs = [("gate", aligned.gate, truth.gate)]
    for field in dataclasses.fields(truth.experts):
        pairs.append(
            (field.name, getattr(aligned.experts, field.name), getattr(truth.experts, field.name))
        )
    squared_error = squared_norm = 0.0
    for name, est, ref in pairs:
        est, ref = est.to(torch.float64), ref.to(torch.float64)
        error = (est - ref).square().sum().item()
        norm = ref.square().sum().item()
        errors[name] = (error / max(norm, 1e-300)) ** 0.5
        squared_error, squared_norm = squared_error + error, squared_norm + norm
    errors["total"] = (squared_error / max(squared_norm, 1e-300)) ** 0.5
    return errors


def regression_errors(prediction, target) -> dict:
    """``{"mse", "mape", "nrmse"}`` of ``prediction`` against ``target`` (the paper's three)."""
    return {
        "mse": mse(prediction, target),
        "mape": mape(prediction, target),
        "nrmse": nrmse(prediction, target),
    }


def classification_errors(probs, labels) -> dict:
    """``{"accuracy", "log_loss"}`` of class probabilities ``probs`` ``(N, M)`` against integer
    ``labels`` ``(N,)``: the share of rows whose most probable class is the label, and the mean
    ``-log probs[n, labels[n]]``."""
    probs = as_tensor("probs", probs, torch.float64)
    labels = as_tensor("labels", labels, allow_integer=True)
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must be (N, M) and labels (N,), got {tuple(probs.shape)} and "
            f"{tuple(labels.shape)}"
        )
    labels = class_labels("labels", labels, probs.shape[1])
    label_probs = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return {
        "accuracy": (probs.argmax(-1) == labels).double().mean().item(),
        "log_loss": -label_probs.log().mean().item(),
    }


def _is_classifier(model) -> bool:
    from .models.multinomial_moe import MultinomialMoE

    return isinstance(model, MultinomialMoE)


def evaluate_fit(model, x, y, truth: MoEParams = None) -> dict:
    """The evaluation every fitting method gets, on held-out ``(x, y)``, at ``model``'s parameters.

    * ``heldout_nll``: mean negative log-likelihood of ``(x, y)``;
    * with ``truth``: ``parameter_error``, the relative error of the permutation-aligned
      parameters (:func:`parameter_error`'s ``"total"``);

    and for a model with real outputs (regression):

    * ``prediction_*``: MSE, MAPE, NRMSE of ``E[y|x]`` against ``y`` (prediction error);
    * with ``truth``: ``estimation_*``, the same errors of ``E[y|x]`` against ``E[y|x]`` under
      ``truth`` (estimation error);

    or for a classifier (:class:`~pyro_mm.models.MultinomialMoE`):

    * ``accuracy`` and ``log_loss`` of the class probabilities ``p(y | x)`` against ``y``
      (:func:`classification_errors`; ``log_loss`` equals ``heldout_nll``);
    * with ``truth``: ``estimation_kl``, the mean over rows of
      ``KL(p_truth(. | x) || p(. | x))``, and ``estimation_accuracy``, the share of rows whose
      most probable class agrees with the truth's.

    :returns: a flat dict of floats.
    """
    x = model.check_x(x)
    y = model.check_y(y, x.shape[0])
    report = {"heldout_nll": mean_nll(model, x, y)}
    if _is_classifier(model):
        with torch.no_grad():
            fitted_probs = model.predict(x)
            report.update(classification_errors(fitted_probs, y))
            if truth is not None:
                true_probs = model.predict(x, truth)
                log_ratio = true_probs.log() - fitted_probs.log()
                kl = (true_probs * log_ratio).nan_to_num(nan=0.0).sum(-1).mean().item()
                agree = (true_probs.argmax(-1) == fitted_probs.argmax(-1)).double().mean().item()
                report["estimation_kl"] = kl
                report["estimation_accuracy"] = agree
                report["parameter_error"] = parameter_error(model.get_params(), truth)["total"]
        return report
    with torch.no_grad():
        fitted_mean = model.predict(x)
        for name, value in regression_errors(fitted_mean, y).items():
            report["prediction_" + name] = value
        if truth is not None:
            true_mean = model.predict(x, truth)
            for name, value in regression_errors(fitted_mean, true_mean).items():
                report["estimation_" + name] = value
            report["parameter_error"] = parameter_error(model.get_params(), truth)["total"]
    return report
