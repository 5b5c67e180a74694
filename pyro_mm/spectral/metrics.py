r"""The parameter-recovery metrics of Makkuva et al. (Section 4).

* ``RegressorFit = max_pi min_i |<a_pi(i), a_i*>|`` (unit-normalised rows);
* ``GatingFit = |<w, w*>|`` (unit-normalised; for ``k > 2``: the smallest ``|cos|`` over gate
  rows, after relabelling the experts by the regressor permutation and re-referencing the gate
  to the last expert);
* ``E(A, W) = min_pi ||A_pi - A*||_F + ||W_pi - W*||_F``, the permutation-free error of the joint
  EM comparison. The paper permutes the rows of ``W* = [w_1*, ..., w_{k-1}*, 0]`` without
  re-referencing; a softmax gate is only defined up to a common shift, so here the permuted
  estimate is re-referenced to its new last expert before the difference is taken.

Permutations are enumerated (``k! `` of them), so these metrics are for small ``k`` (``<= 8``).
"""

import itertools

import torch

__all__ = ["regressor_fit", "gating_fit", "permutation_free_error", "best_regressor_permutation"]

_MAX_EXPERTS = 8


def _unit(rows: torch.Tensor) -> torch.Tensor:
    rows = torch.as_tensor(rows, dtype=torch.float64)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def _permutations(num_experts: int):
    if num_experts > _MAX_EXPERTS:
        raise ValueError(f"these metrics enumerate permutations; k={num_experts} > {_MAX_EXPERTS}")
    return itertools.permutations(range(num_experts))


def _check_pair(estimate, truth, name):
    if estimate.shape != truth.shape:
        raise ValueError(
            f"{name}: estimate {tuple(estimate.shape)} and truth {tuple(truth.shape)} differ in "
            "shape"
        )


def best_regressor_permutation(experts, true_experts) -> tuple:
    """The relabelling ``pi`` (estimate row ``pi[i]`` matches true row ``i``) maximising
    ``min_i |cos|``, ties broken by the sum of ``|cos|``."""
    experts, true_experts = _unit(experts), _unit(true_experts)
    _check_pair(experts, true_experts, "experts")
    cosines = (experts @ true_experts.T).abs()  # (estimate, truth)
    rows = torch.arange(cosines.shape[0])
    return max(
        _permutations(cosines.shape[0]),
        key=lambda p: (cosines[list(p), rows].min().item(), cosines[list(p), rows].sum().item()),
    )


def regressor_fit(experts, true_experts) -> float:
    """``max_pi min_i |<a_pi(i), a_i*>|`` of unit-normalised ``(k, d)`` expert rows."""
    experts, true_experts = _unit(experts), _unit(true_experts)
    order = list(best_regressor_permutation(experts, true_experts))
    return (experts[order] * true_experts).sum(-1).abs().min().item()


def _relabel_gate(gate: torch.Tensor, order) -> torch.Tensor:
    full = torch.nn.functional.pad(torch.as_tensor(gate, dtype=torch.float64), (0, 0, 0, 1))
    full = full[list(order)]
    return full[:-1] - full[-1]


def gating_fit(gate, true_gate, permutation=None) -> float:
    """``min_i |<w_i, w_i*>|`` of unit-normalised gate rows after relabelling by ``permutation``
    (the regressor permutation; default: none) and re-referencing; ``|<w, w*>|`` for ``k = 2``."""
    gate, true_gate = torch.as_tensor(gate), torch.as_tensor(true_gate)
    _check_pair(gate, true_gate, "gate")
    if permutation is not None:
        gate = _relabel_gate(gate, permutation)
    return (_unit(gate) * _unit(true_gate)).sum(-1).abs().min().item()


def permutation_free_error(experts, gate, true_experts, true_gate) -> float:
    """``min_pi ||A_pi - A*||_F + ||W_pi - W*||_F`` (gate re-referenced after relabelling).

    :param experts: ``(k, d)`` estimated expert vectors (not normalised).
    :param gate: ``(k - 1, d)`` estimated gate rows.
    """
    experts = torch.as_tensor(experts, dtype=torch.float64)
    true_experts = torch.as_tensor(true_experts, dtype=torch.float64)
    true_gate = torch.as_tensor(true_gate, dtype=torch.float64)
    _check_pair(experts, true_experts, "experts")
    _check_pair(torch.as_tensor(gate), true_gate, "gate")
    return min(
        (
            (experts[list(p)] - true_experts).norm() + (_relabel_gate(gate, p) - true_gate).norm()
        ).item()
        for p in _permutations(experts.shape[0])
    )
