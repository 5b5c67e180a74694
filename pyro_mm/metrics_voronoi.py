r"""Voronoi losses between a fitted and a true mixture of experts (convergence paper, eq. 6, 10).

A softmax-gated MoE is a mixing measure ``G = sum_i exp(beta_i) delta_(omega_i, eta_i)``: atom
``i`` carries the gate intercept ``beta_i``, the gate slopes ``omega_i`` and the expert's
parameters ``eta_i``. The fitted atoms are assigned to the nearest true atom in
``(omega, eta)`` (the Voronoi cells ``A_j``), and

.. math:: \mathcal L_1(G, G_*) = \sum_j \Big|\sum_{i \in A_j} e^{\beta_i} - e^{\beta^*_j}\Big|
    + \sum_{j: |A_j| = 1} \sum_{i \in A_j} e^{\beta_i}
        (\|\Delta\omega_{ij}\| + \|\Delta\eta_{ij}\|)
    + \sum_{j: |A_j| > 1} \sum_{i \in A_j} e^{\beta_i}
        (\|\Delta\omega_{ij}\|^2 + \|\Delta\eta_{ij}\|^2).

It needs no permutation of the experts and is defined for any number of fitted experts, in
particular an over-specified ``K > K_*``, where the exactly specified atoms (singleton cells) are
measured linearly and the over-specified ones (cells of several atoms) quadratically, matching
their ``n^{-1/2}`` and ``n^{-1/4}`` estimation rates.

**Gate normalisation.** The softmax is unchanged by adding the same ``(c, d)`` to every
``(beta_i, omega_i)``, so the gates are first translated to a reference: the intercepts so
that ``sum_i exp(beta_i) = 1`` (the gate's weights at ``x = 0``) and the slopes so that their
weighted mean ``sum_i exp(beta_i) omega_i`` is zero. Unlike "the last expert is zero", this
reference is unchanged when an atom is split into several atoms with the same ``(omega, eta)``,
so a fit that represents the truth exactly with more experts has loss zero.
"""

import dataclasses

import torch

from .models.params import MoEParams

__all__ = ["MixingMeasure", "mixing_measure", "voronoi_cells", "voronoi_loss"]


@dataclasses.dataclass
class MixingMeasure:
    """The atoms of a mixture of experts, gate normalised to the reference described above.

    :ivar torch.Tensor log_weight: ``(K,)`` intercepts ``beta_i`` (``logsumexp = 0``).
    :ivar torch.Tensor gate_slope: ``(K, D_g - 1)`` slopes ``omega_i`` (weighted mean zero).
    :ivar torch.Tensor expert: ``(K, E)`` the experts' parameters ``eta_i``, flattened.
    """

    log_weight: torch.Tensor
    gate_slope: torch.Tensor
    expert: torch.Tensor


def mixing_measure(
    params: MoEParams, intercept_column: int = 0, expert_fields=None
) -> MixingMeasure:
    """The normalised mixing measure of ``params``.

    :param MoEParams params: gate ``(K - 1, D_g)`` with a reference expert, and expert parameters
        with a leading dimension ``K``.
    :param int intercept_column: the gate feature that is the constant ``1`` (column 0 of
        :class:`~pyro_mm.models.features.PolynomialFeatures`).
    :param expert_fields: names of the expert parameter fields that make up ``eta`` (default:
        all, e.g. ``("weight", "variance")`` for Gaussian experts).
    """
    gate = params.gate.to(torch.float64)
    num_columns = gate.shape[-1]
    if not -num_columns <= intercept_column < num_columns:
        raise ValueError(
            f"intercept_column={intercept_column} is not a column of the {num_columns} gate "
            "features"
        )
    full_gate = torch.nn.functional.pad(gate, (0, 0, 0, 1))
    beta = full_gate[:, intercept_column]
    keep = [c for c in range(num_columns) if c != intercept_column % num_columns]
    omega = full_gate[:, keep]
    log_weight = beta - torch.logsumexp(beta, 0)
    omega = omega - log_weight.exp() @ omega
    return MixingMeasure(
        log_weight=log_weight, gate_slope=omega, expert=_expert_atoms(params, expert_fields)
    )


def _expert_atoms(params: MoEParams, expert_fields) -> torch.Tensor:
    fields = [f.name for f in dataclasses.fields(params.experts)]
    names = fields if expert_fields is None else list(expert_fields)
    unknown = sorted(set(names) - set(fields))
    if unknown or not names:
        raise ValueError(f"expert_fields must name some of {fields}, got {expert_fields!r}")
    num_experts = params.gate.shape[0] + 1
    blocks = []
    for name in names:
        leaf = getattr(params.experts, name)
        if leaf.shape[0] != num_experts:
            raise ValueError(
                f"expert field {name!r} has {leaf.shape[0]} experts but the gate has {num_experts}"
            )
        blocks.append(leaf.reshape(num_experts, -1).to(torch.float64))
    return torch.cat(blocks, dim=-1)


def voronoi_cells(estimate: MixingMeasure, truth: MixingMeasure) -> list:
    """``A_j``: for every true atom ``j``, the fitted atoms nearest to it in ``(omega, eta)``.

    :returns: a list of ``K_*`` lists of fitted atom indices (possibly empty); ties go to the
        lower true index.
    """
    fitted = torch.cat([estimate.gate_slope, estimate.expert], dim=-1)
    true = torch.cat([truth.gate_slope, truth.expert], dim=-1)
    nearest = torch.cdist(fitted, true).argmin(dim=-1)
    return [torch.nonzero(nearest == j).flatten().tolist() for j in range(true.shape[0])]


def voronoi_loss(
    estimate: MoEParams,
    truth: MoEParams,
    *,
    exponent: float = None,
    intercept_column: int = 0,
    expert_fields=None,
) -> dict:
    r"""The Voronoi loss of ``estimate`` against ``truth`` (any numbers of experts).

    :param MoEParams estimate: the fitted parameters, ``K`` experts.
    :param MoEParams truth: the true parameters, ``K_*`` experts, same feature maps.
    :param float exponent: ``None`` for the paper's ``L_1`` (eq. 6: exponent 1 in singleton
        cells, 2 in cells of several atoms, the loss for strongly identifiable experts);
        a number ``r >= 1`` for the loss with exponent ``r`` in every cell (eq. 10, ``L_{2,r}``,
        the one for linear experts).
    :param int intercept_column: the gate feature that is the constant ``1``.
    :param expert_fields: the expert parameter fields that make up ``eta`` (default: all).
    :returns: ``{"total", "mass", "exact", "over_specified", "cells"}``: the loss, its three
        terms (mass mismatch per cell; atoms in singleton cells; atoms in multi-atom cells) and
        the cells ``A_j`` (lists of fitted expert indices).
    :raises ValueError: for parameters of different feature maps or expert shapes.
    """
    if exponent is not None and not float(exponent) >= 1:
        raise ValueError(f"exponent must be None or a number >= 1, got {exponent!r}")
    if estimate.gate.shape[-1] != truth.gate.shape[-1]:
        raise ValueError(
            f"the gates have {estimate.gate.shape[-1]} and {truth.gate.shape[-1]} features; "
            f"compare parameters of the same feature map"
        )
    fitted = mixing_measure(estimate, intercept_column, expert_fields)
    true = mixing_measure(truth, intercept_column, expert_fields)
    if fitted.expert.shape[-1] != true.expert.shape[-1]:
        raise ValueError(
            f"the experts have {fitted.expert.shape[-1]} and {true.expert.shape[-1]} parameters "
            f"each; compare parameters of the same expert family and shapes"
        )
    cells = voronoi_cells(fitted, true)
    weight = fitted.log_weight.exp()
    mass = exact = over = 0.0
    for j, cell in enumerate(cells):
        mass += abs(weight[cell].sum().item() - true.log_weight[j].exp().item())
        if not cell:
            continue
        slope_gap = (fitted.gate_slope[cell] - true.gate_slope[j]).norm(dim=-1)
        expert_gap = (fitted.expert[cell] - true.expert[j]).norm(dim=-1)
        power = (1.0 if len(cell) == 1 else 2.0) if exponent is None else float(exponent)
        term = (weight[cell] * (slope_gap.pow(power) + expert_gap.pow(power))).sum().item()
        if len(cell) == 1:
            exact += term
        else:
            over += term
    return {
        "total": mass + exact + over,
        "mass": mass,
        "exact": exact,
        "over_specified": over,
        "cells": cells,
    }
