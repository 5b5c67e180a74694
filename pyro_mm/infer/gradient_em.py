r"""Gradient EM (paper 002, Appendix D.2): one gradient step per block on the M-step objective.

With responsibilities ``tau`` from the E-step at ``theta_t`` and the M-step objective
``Q(theta | theta_t) = -avg_n sum_k tau_nk log[g_k(x_n; W) e_k(y_n | x_n; theta_E)]``,

.. math:: W_{t+1} = W_t - \gamma_{gate} \nabla_W Q(\theta_t \mid \theta_t), \qquad
          \theta_{E,t+1} = \theta_{E,t}
          - \gamma_{experts} \nabla_{\theta_E} Q(\theta_t \mid \theta_t).

The gradients are taken in the model's unconstrained Pyro coordinates (the identity for weights,
``log`` for variances), so constrained parameters stay valid. Because
``grad_theta Q(theta | theta_t)`` at ``theta = theta_t`` equals ``grad L(theta_t)``, gradient EM
with ``lr_gate = lr_experts`` is exactly gradient descent on the mean negative log-likelihood
(Pyro's ``SVI`` with ``SGD`` on the same model); different step sizes per block are the only
difference, as the paper notes.
"""

import dataclasses

import torch
from torch.distributions import transform_to

from ..models.base import MixtureOfExperts
from ..models.params import MoEParams
from ..validation import positive_integer, positive_number
from .em_like import EMLikeInference
from .fit_loop import fit_batches
from .history import FitHistory

__all__ = ["GradientEM"]


class GradientEM(EMLikeInference):
    r"""Gradient EM for softmax-gated mixtures of experts.

    ::

        infer = GradientEM(model, lr_gate=1.0, lr_experts=0.5)
        for _ in range(200):
            loss = infer.step(x, y)

    :param MixtureOfExperts model: the model to fit; its expert parameters must be Pyro params
        named ``expert_<field>`` after the fields of its expert-parameter dataclass (true for the
        bundled models), whose constraints define the unconstrained coordinates; its gate's are
        the params its gate names (``model.gate.param_names``).
    :param float lr_gate: step size ``gamma_gate`` of the gate block (on the mean NLL scale).
    :param float lr_experts: step size ``gamma_experts`` of the expert block.
    :param int batch_size: rows per step used by :meth:`fit` on array inputs (``None``: the whole
        data set at every step).
    :param float ridge: ridge of the expert solve used by the K-means initialisation.
    :param float variance_floor: variance floor of that solve.
    :param str init: as in :class:`~pyro_mm.infer.EM`.
    :param int seed: seed of the K-means initialisation.
    :param torch.dtype dtype: dtype of the parameters and computations.
    """

    name = "GradientEM"
    option_names = ("lr_gate", "lr_experts")

    def __init__(
        self,
        model: MixtureOfExperts,
        lr_gate: float,
        lr_experts: float,
        batch_size: int = None,
        *,
        ridge: float = 1e-8,
        variance_floor: float = 1e-6,
        init: str = "auto",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        self.lr_gate = positive_number("lr_gate", lr_gate)
        self.lr_experts = positive_number("lr_experts", lr_experts)
        self.batch_size = None if batch_size is None else positive_integer("batch_size", batch_size)
        super().__init__(
            model,
            ridge=ridge,
            variance_floor=variance_floor,
            init=init,
            seed=seed,
            dtype=dtype,
        )
        self._gate_transforms, self._expert_transforms = _unconstraining_transforms(self.model)

    def step(self, x, y) -> float:
        """One gradient-EM step on the batch given.

        :param x: inputs ``(N, P)``.
        :param y: outputs.
        :returns: the batch's mean negative log-likelihood at the parameters the step was given.
        :rtype: float
        """
        x, y, u, r, _, resp, loss = self._prepare(x, y)
        gate, experts = self._unconstrained(self._iterate)
        expert_leaves = [getattr(experts, name) for name in self._expert_transforms]
        num_gate = len(gate)
        with torch.enable_grad():
            for leaf in gate + expert_leaves:
                leaf.requires_grad_(True)
            log_joint = self.model.log_joint_from_features(
                self._constrained(gate, experts), u, r, y
            )
            objective = -(resp * log_joint).sum(-1).mean()
            gradients = torch.autograd.grad(objective, gate + expert_leaves)
        with torch.no_grad():
            gate = [
                leaf - self.lr_gate * gradient for leaf, gradient in zip(gate, gradients[:num_gate])
            ]
            experts = dataclasses.replace(
                experts,
                **{
                    name: leaf - self.lr_experts * gradient
                    for name, leaf, gradient in zip(
                        self._expert_transforms, expert_leaves, gradients[num_gate:]
                    )
                },
            )
            params = self._constrained(gate, experts)
        self._commit(params, x.shape[0])
        return loss.item()

    def fit(
        self,
        x,
        y=None,
        *,
        batch_size: int = None,
        epochs: int = 1,
        shuffle: bool = False,
        progress: bool = True,
    ) -> FitHistory:
        """Runs :meth:`step` over a whole stream (for full-batch gradient EM: ``epochs`` steps).

        :param x: inputs ``(N, P)``, or (with ``y=None``) an iterable of ``(x, y)`` batches.
        :param y: outputs, or ``None`` when ``x`` is a stream of batches.
        :param int batch_size: rows per step for array inputs (default: the constructor's).
        :param int epochs: passes over the data.
        :param bool shuffle: take the rows of arrays in a new random order at each epoch
            (seeded by ``seed``); without it, in their order, which must then be random.
        :param bool progress: show a tqdm progress bar.
        :returns: the :class:`FitHistory` of this call (also appended to ``self.history``).
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        return fit_batches(
            self, x, y, batch_size, epochs, shuffle=shuffle, progress=progress, desc=self.name
        )

    # --------------------------------------------------------------------------- internals
    def _unconstrained(self, params: MoEParams):
        """``(gate leaves, experts)`` in unconstrained coordinates, detached copies (the gate as
        the list of its param tensors)."""
        experts = dataclasses.replace(
            params.experts,
            **{
                name: transform.inv(getattr(params.experts, name)).detach().clone()
                for name, transform in self._expert_transforms.items()
            },
        )
        gate = [
            transform.inv(leaf).detach().clone()
            for transform, leaf in zip(self._gate_transforms, self.model.gate.leaves(params.gate))
        ]
        return gate, experts

    def _constrained(self, gate: list, experts) -> MoEParams:
        return MoEParams(
            gate=self.model.gate.from_leaves(
                [transform(leaf) for transform, leaf in zip(self._gate_transforms, gate)]
            ),
            experts=dataclasses.replace(
                experts,
                **{
                    name: transform(getattr(experts, name))
                    for name, transform in self._expert_transforms.items()
                },
            ),
        )


def _unconstraining_transforms(model: MixtureOfExperts):
    """The bijections from unconstrained space to each parameter's support, from the model's
    Pyro params: the gate's (``model.gate.param_names``, in order) and ``expert_<field>`` for
    each expert field."""
    constraints = {name: spec[0] for name, spec in model._pyro_params.items()}
    expert_fields = [f.name for f in dataclasses.fields(model.get_expert_params())]
    gate_names = list(model.gate.param_names)
    wanted = gate_names + [f"expert_{name}" for name in expert_fields]
    missing = [name for name in wanted if name not in constraints]
    if missing:
        raise TypeError(
            f"GradientEM needs the gate's Pyro params {gate_names} and expert_<field> for every "
            f"expert field; {type(model).__name__} lacks {missing}"
        )
    experts = {name: transform_to(constraints[f"expert_{name}"]) for name in expert_fields}
    return [transform_to(constraints[name]) for name in gate_names], experts
