"""Gate variants of the convergence paper: the temperature gate and the two-level hierarchical
gate. Their MM surrogates majorise the gate's cross-entropy and touch it, their solves are the
argmins, the MM iteration converges to the exact EM M-step, and a hierarchical mixture of
Gaussian experts fitted by these blocks decreases its NLL monotonically."""

import pytest
import torch

from pyro_mm.models.gate_variants import (
    HierarchicalGateParams,
    hierarchical_gate_log_probs,
    temperature_gate_log_probs,
)
from pyro_mm.models.gating import gate_log_probs
from pyro_mm.models.gaussian_moe import gaussian_expert_log_prob
from pyro_mm.models.params import GaussianExpertParams
from pyro_mm.surrogates import GaussianExpertSurrogate, softmax_curvature
from pyro_mm.surrogates.gate_variants import (
    hierarchical_gate_m_step,
    hierarchical_gate_statistics,
    hierarchical_gate_surrogate_value,
    solve_hierarchical_gate,
    solve_temperature_gate,
    temperature_gate_m_step,
    temperature_gate_statistics,
    temperature_gate_surrogate_value,
)

EPS = 1e-6
GROUPS, SIZE = 2, 3  # groups, experts per group


def _features(seed, num_rows=80):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, 2, generator=generator, dtype=torch.float64)
    return generator, torch.cat([torch.ones(num_rows, 1, dtype=torch.float64), x], -1)


def _soft_labels(generator, num_rows, num_classes):
    return torch.softmax(2 * torch.randn(num_rows, num_classes, generator=generator), -1).double()


def _random_hierarchical(generator, scale=1.0):
    return HierarchicalGateParams(
        outer=scale * torch.randn(GROUPS - 1, 3, generator=generator, dtype=torch.float64),
        inner=scale * torch.randn(GROUPS, SIZE - 1, 3, generator=generator, dtype=torch.float64),
    )


def _cross_entropy(log_probs, resp):
    return -(resp * log_probs).sum(-1).mean()


# ------------------------------------------------------------------------ temperature gate
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("bound", ["bohning", "paper"])
def test_temperature_surrogate_majorises_touches_and_solves(temperature, bound):
    generator, u = _features(0)
    resp = _soft_labels(generator, 80, 4)
    curvature = softmax_curvature(3, bound)
    anchor = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    probs = temperature_gate_log_probs(anchor, u, temperature).exp()
    stats = temperature_gate_statistics(anchor, u, probs, resp, curvature, EPS, temperature)

    def loss(weight):
        return _cross_entropy(temperature_gate_log_probs(weight, u, temperature), resp)

    def surrogate(weight):
        return temperature_gate_surrogate_value(weight, stats, curvature, EPS, temperature)

    # Majorisation relative to the anchor (the statistics give the surrogate up to a constant).
    for _ in range(20):
        point = anchor + 2 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
        assert surrogate(point) - surrogate(anchor) >= loss(point) - loss(anchor) - 1e-12
    # Touching: equal gradients at the anchor.
    at = anchor.clone().requires_grad_()
    (surrogate_grad,) = torch.autograd.grad(surrogate(at), at)
    at = anchor.clone().requires_grad_()
    (loss_grad,) = torch.autograd.grad(loss(at), at)
    assert torch.allclose(surrogate_grad, loss_grad, atol=1e-12)
    # The solve is the argmin.
    solved = solve_temperature_gate(stats, curvature, EPS, temperature).requires_grad_()
    (grad,) = torch.autograd.grad(surrogate(solved), solved)
    assert grad.abs().max() < 1e-10


def test_temperature_only_rescales_the_gate_weights_of_a_linear_router():
    """With a linear router only omega / T is identified: the MM iterates' gate probabilities
    are the same for every fixed temperature, and the EM M-step's optimum is the same gate."""
    generator, u = _features(1)
    resp = _soft_labels(generator, 80, 3)
    curvature = softmax_curvature(2)
    start = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    gates = []
    for temperature in (0.2, 1.0, 5.0):
        weight = start * temperature
        for _ in range(30):
            probs = temperature_gate_log_probs(weight, u, temperature).exp()
            stats = temperature_gate_statistics(weight, u, probs, resp, curvature, EPS, temperature)
            weight = solve_temperature_gate(stats, curvature, EPS, temperature)
        exact = temperature_gate_m_step(u, resp, start * temperature, temperature).weight
        probs = temperature_gate_log_probs(weight, u, temperature).exp()
        exact_probs = temperature_gate_log_probs(exact, u, temperature).exp()
        gates.append((probs, exact_probs))
        at = exact.clone().requires_grad_()
        loss = _cross_entropy(temperature_gate_log_probs(at, u, temperature), resp)
        (grad,) = torch.autograd.grad(loss, at)
        assert grad.abs().max() < 1e-8
    for probs, exact_probs in gates[1:]:
        assert torch.allclose(probs, gates[0][0], atol=1e-10)
        assert torch.allclose(exact_probs, gates[0][1], atol=1e-8)
    with pytest.raises(ValueError, match="temperature"):
        temperature_gate_log_probs(start, u, 0.0)


# ----------------------------------------------------------------------- hierarchical gate
def test_hierarchical_gate_is_normalised_and_factorises():
    generator, u = _features(2)
    params = _random_hierarchical(generator)
    log_probs = hierarchical_gate_log_probs(params, u)
    assert log_probs.shape == (80, GROUPS * SIZE)
    assert torch.allclose(torch.logsumexp(log_probs, -1), torch.zeros(80, dtype=torch.float64))
    outer = torch.softmax(torch.nn.functional.pad(u @ params.outer.T, (0, 1)), -1)
    inner = torch.softmax(torch.nn.functional.pad(u @ params.inner[1].T, (0, 1)), -1)
    assert torch.allclose(log_probs[:, SIZE:].exp(), outer[:, 1:2] * inner)


@pytest.mark.parametrize("bound", ["bohning", "paper"])
def test_hierarchical_surrogate_majorises_touches_and_solves(bound):
    generator, u = _features(3)
    resp = _soft_labels(generator, 80, GROUPS * SIZE)
    outer_c, inner_c = softmax_curvature(GROUPS - 1, bound), softmax_curvature(SIZE - 1, bound)
    anchor = _random_hierarchical(generator)
    stats = hierarchical_gate_statistics(anchor, u, resp, outer_c, inner_c, EPS)

    def loss(params):
        return _cross_entropy(hierarchical_gate_log_probs(params, u), resp)

    def surrogate(params):
        return hierarchical_gate_surrogate_value(params, stats, outer_c, inner_c, EPS)

    for _ in range(20):
        point = _random_hierarchical(generator, scale=2.0)
        assert surrogate(point) - surrogate(anchor) >= loss(point) - loss(anchor) - 1e-12
    leaves = [anchor.outer.clone().requires_grad_(), anchor.inner.clone().requires_grad_()]
    surrogate_grads = torch.autograd.grad(surrogate(HierarchicalGateParams(*leaves)), leaves)
    leaves = [anchor.outer.clone().requires_grad_(), anchor.inner.clone().requires_grad_()]
    loss_grads = torch.autograd.grad(loss(HierarchicalGateParams(*leaves)), leaves)
    for a, b in zip(surrogate_grads, loss_grads):
        assert torch.allclose(a, b, atol=1e-12)
    solved = solve_hierarchical_gate(stats, outer_c, inner_c, EPS)
    leaves = [solved.outer.clone().requires_grad_(), solved.inner.clone().requires_grad_()]
    grads = torch.autograd.grad(surrogate(HierarchicalGateParams(*leaves)), leaves)
    assert max(g.abs().max().item() for g in grads) < 1e-10


def test_hierarchical_mm_descends_to_the_exact_em_m_step():
    generator, u = _features(4, num_rows=200)
    resp = _soft_labels(generator, 200, GROUPS * SIZE)
    outer_c, inner_c = softmax_curvature(GROUPS - 1), softmax_curvature(SIZE - 1)
    params = _random_hierarchical(generator, scale=0.1)
    fit = hierarchical_gate_m_step(u, resp, params, tol=1e-12)
    assert fit.converged
    exact = fit.weight
    losses = []
    for _ in range(400):
        losses.append(_cross_entropy(hierarchical_gate_log_probs(params, u), resp).item())
        stats = hierarchical_gate_statistics(params, u, resp, outer_c, inner_c, 0.0)
        params = solve_hierarchical_gate(stats, outer_c, inner_c, 0.0)
    assert all(b <= a + 1e-13 for a, b in zip(losses, losses[1:]))
    exact_loss = _cross_entropy(hierarchical_gate_log_probs(exact, u), resp).item()
    assert abs(losses[-1] - exact_loss) < 1e-9
    assert (params.outer - exact.outer).abs().max() < 1e-4
    assert (params.inner - exact.inner).abs().max() < 1e-4


def test_hierarchical_mixture_of_gaussian_experts_fitted_by_mm():
    """A two-level MoE (2 groups of 3 linear Gaussian experts) fitted by batch MM built from the
    hierarchical gate block and the Gaussian expert block: the NLL decreases at every step."""
    generator, u = _features(5, num_rows=1500)
    truth_gate = HierarchicalGateParams(
        outer=torch.tensor([[0.0, 3.0, 0.0]], dtype=torch.float64),
        inner=torch.tensor(
            [[[0.0, 0.0, 3.0], [1.0, 0.0, -3.0]], [[0.0, 2.0, 2.0], [0.0, -2.0, 2.0]]],
            dtype=torch.float64,
        ),
    )
    weight = 2 * torch.randn(GROUPS * SIZE, 1, 3, generator=generator, dtype=torch.float64)
    log_gate = hierarchical_gate_log_probs(truth_gate, u)
    z = torch.multinomial(log_gate.exp(), 1, generator=generator).squeeze(-1)
    y = (weight[z, 0] * u).sum(-1, keepdim=True)
    y = y + 0.3 * torch.randn(y.shape, generator=generator, dtype=torch.float64)

    experts_block = GaussianExpertSurrogate()
    outer_c, inner_c = softmax_curvature(GROUPS - 1), softmax_curvature(SIZE - 1)
    gate = HierarchicalGateParams(
        torch.zeros(GROUPS - 1, 3).double(), torch.zeros(GROUPS, SIZE - 1, 3).double()
    )
    experts = GaussianExpertParams(
        weight=weight + 0.5 * torch.randn(weight.shape, generator=generator, dtype=torch.float64),
        variance=torch.ones(GROUPS * SIZE, 1, dtype=torch.float64),
    )
    losses = []
    for _ in range(60):
        log_joint = hierarchical_gate_log_probs(gate, u) + gaussian_expert_log_prob(experts, u, y)
        losses.append(-torch.logsumexp(log_joint, -1).mean().item())
        resp = torch.softmax(log_joint, -1)
        stats = hierarchical_gate_statistics(gate, u, resp, outer_c, inner_c, EPS)
        gate = solve_hierarchical_gate(stats, outer_c, inner_c, EPS)
        experts, _ = experts_block.solve(experts_block.statistics(experts, u, y, resp), experts)
    assert all(b <= a + 1e-10 for a, b in zip(losses, losses[1:]))
    truth_nll = -torch.logsumexp(
        hierarchical_gate_log_probs(truth_gate, u)
        + gaussian_expert_log_prob(
            GaussianExpertParams(weight, torch.full((GROUPS * SIZE, 1), 0.09, dtype=torch.float64)),
            u,
            y,
        ),
        -1,
    ).mean()
    assert losses[-1] < truth_nll.item() + 0.05
    assert not torch.allclose(gate_log_probs(gate.outer, u), torch.zeros(1500, GROUPS).double())
