"""The gate option of the models (``gate=TemperatureGate(...)`` / ``HierarchicalGate(...)``): the
Pyro model, every inference class through the gate-block registry, checkpoints, the fast path
kept for the softmax gate only, and the errors for bad options."""

import io
import math

import pyro
import pytest
import torch
from helpers import init_local_gloo
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_mm import (
    EM,
    GaussianMoE,
    GradientEM,
    HierarchicalGate,
    IncrementalMM,
    MirrorDescentEM,
    MoEParams,
    PowerDecay,
    SoftmaxGate,
    SVIFit,
    TemperatureGate,
)
from pyro_mm.infer.em import batch_mm
from pyro_mm.models.gate_variants import HierarchicalGateParams, hierarchical_gate_log_probs
from pyro_mm.models.params import GaussianExpertParams, tree_leaves
from pyro_mm.surrogates import (
    CoefficientPenalty,
    HierarchicalGateSurrogate,
    SoftmaxGateSurrogate,
    TemperatureGateSurrogate,
    gate_surrogate_for,
)

GROUPS, SIZE = 2, 3
GATES = {
    "temperature": lambda: TemperatureGate(temperature=0.5),
    "hierarchical": lambda: HierarchicalGate(num_groups=GROUPS, group_size=SIZE),
}
TRUTH_GATE = HierarchicalGateParams(
    outer=torch.tensor([[0.0, 3.0, 0.0]], dtype=torch.float64),
    inner=torch.tensor(
        [[[0.0, 0.0, 3.0], [1.0, 0.0, -3.0]], [[0.0, 2.0, 2.0], [0.0, -2.0, 2.0]]],
        dtype=torch.float64,
    ),
)
TRUTH_EXPERTS = GaussianExpertParams(
    weight=torch.tensor(
        [
            [[-3.0, 1.0, 0.0]],
            [[0.0, -2.0, 1.0]],
            [[3.0, 0.0, 2.0]],
            [[-1.5, 2.0, -1.0]],
            [[1.5, 1.0, 1.0]],
            [[0.0, 0.0, -2.5]],
        ],
        dtype=torch.float64,
    ),
    variance=torch.full((GROUPS * SIZE, 1), 0.09, dtype=torch.float64),
)


def _hierarchical_data(num_rows, seed):
    """Rows of the seeded 2 x 3 hierarchical Gaussian MoE ``TRUTH_GATE``, ``TRUTH_EXPERTS``."""
    model = GaussianMoE(GROUPS * SIZE, 2, gate=GATES["hierarchical"]()).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, 2, generator=generator, dtype=torch.float64)
    truth = MoEParams(gate=TRUTH_GATE, experts=TRUTH_EXPERTS)
    y, _ = model.sample(x, truth, generator=generator)
    return x, y, truth


def _model(kind):
    return GaussianMoE(GROUPS * SIZE, 2, gate=GATES[kind]())


def _nll(model, x, y):
    return -model.log_prob(x, y).mean().item()


# ------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kind", sorted(GATES))
def test_pyro_model_svi_and_predictive_run_with_each_gate(kind):
    x, y, _ = _hierarchical_data(400, seed=0)
    model = _model(kind).double()
    names = {"gate_weight"} if kind == "temperature" else {"gate_outer", "gate_inner"}
    trace = pyro.poutine.trace(model).get_trace(x, y)
    assert names <= set(trace.nodes) and trace.nodes["y"]["is_observed"]
    # The Pyro model's density is the model's log_prob.
    assert torch.allclose(trace.nodes["y"]["fn"].log_prob(y), model.log_prob(x, y), atol=1e-12)
    svi = SVI(model, lambda x, y=None: None, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(60)]
    assert losses[-1] < losses[0] - 0.2 * abs(losses[0])
    assert names <= set(pyro.get_param_store().keys())
    draws = Predictive(model, num_samples=3)(x)["y"]
    assert draws.shape == (3, 400, 1)
    assert model.predict(x).shape == (400, 1)
    assert torch.allclose(model.responsibilities(x, y).sum(-1), torch.ones(400).double())
    assert torch.allclose(model.gate_probs(x).sum(-1), torch.ones(400).double())


def test_hierarchical_params_are_a_dataclass_written_to_two_pyro_params():
    model = _model("hierarchical").double()
    assert model.gate.param_names == ("gate_outer", "gate_inner")
    params = model.get_params()
    assert isinstance(params.gate, HierarchicalGateParams)
    assert params.gate.outer.shape == (1, 3) and params.gate.inner.shape == (2, 2, 3)
    model.set_params(MoEParams(gate=TRUTH_GATE, experts=TRUTH_EXPERTS))
    assert torch.equal(model.gate_outer, TRUTH_GATE.outer)
    assert torch.equal(model.gate_inner, TRUTH_GATE.inner)
    x = torch.randn(20, 2, dtype=torch.float64)
    log_gate = hierarchical_gate_log_probs(TRUTH_GATE, model.gate_features(x))
    assert torch.allclose(model.gate_probs(x).log(), log_gate)
    with pytest.raises(TypeError, match="HierarchicalGateParams"):
        model.set_params(MoEParams(gate=torch.zeros(5, 3), experts=TRUTH_EXPERTS))
    assert "gate=HierarchicalGate(num_groups=2, group_size=3)" in repr(model)
    assert "gate=" not in repr(GaussianMoE(2, 2))


def test_the_full_covariance_model_takes_a_gate():
    model = GaussianMoE(6, 2, 2, covariance="full", gate=GATES["hierarchical"]())
    assert isinstance(model.get_params().gate, HierarchicalGateParams)
    x = torch.randn(300, 2)
    y = torch.randn(300, 2)
    EM(model).step(x, y)
    infer = IncrementalMM(model, init="current")
    losses = [infer.step(x, y) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    assert model.sample(x)[0].shape == (300, 2)


# ---------------------------------------------------------------------- the gate blocks
def test_the_registry_gives_each_gate_its_block_and_the_fast_path_only_the_softmax_gate():
    assert type(gate_surrogate_for(GaussianMoE(2, 2))) is SoftmaxGateSurrogate
    assert type(gate_surrogate_for(_model("temperature"))) is TemperatureGateSurrogate
    assert type(gate_surrogate_for(_model("hierarchical"))) is HierarchicalGateSurrogate
    assert IncrementalMM(GaussianMoE(2, 2))._fused_statistics is not None
    for kind in GATES:
        assert IncrementalMM(_model(kind))._fused_statistics is None


# ------------------------------------------------------------------------ the batch methods
BATCH_METHODS = {
    "EM": lambda model: EM(model, init="current"),
    "batch MM": lambda model: batch_mm(model, init="current"),
    "MirrorDescentEM": lambda model: MirrorDescentEM(model, step_size=0.5, init="current"),
}


def _perturbed_start(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    experts = GaussianExpertParams(
        weight=TRUTH_EXPERTS.weight
        + 0.7 * torch.randn(TRUTH_EXPERTS.weight.shape, generator=generator, dtype=torch.float64),
        variance=torch.ones(GROUPS * SIZE, 1, dtype=torch.float64),
    )
    gate = model.get_params().gate
    model.set_params(MoEParams(gate=gate, experts=experts))
    return model


@pytest.mark.parametrize("method", sorted(BATCH_METHODS))
@pytest.mark.parametrize("kind", sorted(GATES))
def test_batch_methods_never_increase_the_nll(kind, method):
    x, y, _ = _hierarchical_data(600, seed=1)
    model = _perturbed_start(_model(kind).double())
    infer = BATCH_METHODS[method](model)
    losses = [infer.step(x, y) for _ in range(25)]
    losses.append(_nll(model, x, y))
    assert all(b <= a + 1e-10 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.3


STOCHASTIC_METHODS = {
    "IncrementalMM": lambda model: IncrementalMM(model, schedule=PowerDecay(1.0, 0.6)),
    "MirrorDescentEM": lambda model: MirrorDescentEM(
        model, step_size=PowerDecay(1.0, 0.6), batch_size=200
    ),
    "GradientEM": lambda model: GradientEM(model, lr_gate=0.5, lr_experts=0.2, batch_size=100),
    "SVIFit": lambda model: SVIFit(model, optim=torch.optim.Adam, optim_args={"lr": 0.02}),
}


@pytest.mark.parametrize("method", sorted(STOCHASTIC_METHODS))
@pytest.mark.parametrize("kind", sorted(GATES))
def test_stochastic_methods_lower_the_nll(kind, method):
    x, y, _ = _hierarchical_data(2000, seed=2)
    model = _model(kind).double()
    start = _nll(model, x, y)
    infer = STOCHASTIC_METHODS[method](model)
    infer.fit(x, y, batch_size=100, epochs=2, progress=False)
    model.gate.leaves(model.get_params().gate)  # the gate's own kind of parameters
    assert _nll(model, x, y) < start - 0.5


# --------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("method", ["EM", "batch MM"])
def test_temperature_gate_fits_the_plain_gate_with_weights_scaled_by_t(method):
    x, y, _ = _hierarchical_data(600, seed=4)
    temperature = 0.4
    plain = _perturbed_start(GaussianMoE(6, 2).double())
    hot = GaussianMoE(6, 2, gate=TemperatureGate(temperature)).double()
    start = plain.get_params()
    hot.set_params(MoEParams(gate=temperature * start.gate, experts=start.experts))
    fits = [BATCH_METHODS[method](model) for model in (plain, hot)]
    for _ in range(15):
        plain_loss, hot_loss = (fit.step(x, y) for fit in fits)
        assert math.isclose(plain_loss, hot_loss, rel_tol=1e-9, abs_tol=1e-9)
    a, b = plain.get_params(), hot.get_params()
    assert torch.allclose(temperature * a.gate, b.gate, atol=1e-7)
    assert torch.allclose(a.experts.weight, b.experts.weight, atol=1e-7)
    assert torch.allclose(plain.gate_probs(x), hot.gate_probs(x), atol=1e-8)


# --------------------------------------------------------------------------- hierarchical
def test_em_recovers_a_seeded_two_by_three_hierarchical_truth():
    x, y, truth = _hierarchical_data(4000, seed=5)
    model = _perturbed_start(_model("hierarchical").double())
    EM(model, init="current").fit(x, y, max_iter=300, tol=1e-9, progress=False)
    fitted = model.get_params()
    # The start is close to the truth's labelling: no relabelling is needed.
    assert (fitted.experts.weight - truth.experts.weight).abs().max() < 0.1
    assert (fitted.experts.variance - truth.experts.variance).abs().max() < 0.02
    gate_error = (model.gate_probs(x) - model.gate_probs(x, truth)).abs().mean()
    assert gate_error < 0.02
    assert _nll(model, x, y) <= -model.log_prob(x, y, truth).mean().item() + 1e-3


def test_kmeans_logistic_start_fits_each_level_of_the_hierarchical_gate():
    x, y, _ = _hierarchical_data(1000, seed=6)
    model = _model("hierarchical").double()
    infer = IncrementalMM(model, init="kmeans-logistic")
    infer.initialize(x, y)
    gate = infer.params.gate
    assert isinstance(gate, HierarchicalGateParams)
    assert gate.outer.abs().max() > 0.1 and gate.inner.abs().max() > 0.1


# ---------------------------------------------------------------------------- checkpoints
def test_incremental_mm_checkpoint_of_a_hierarchical_gate_resumes_bit_identically():
    x, y, _ = _hierarchical_data(1200, seed=7)
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1200, 100)]
    infer = IncrementalMM(_model("hierarchical"), polyak_start=3)
    for batch in batches[:6]:
        infer.step(*batch)
    buffer = io.BytesIO()
    torch.save(infer.state_dict(), buffer)
    for batch in batches[6:]:
        infer.step(*batch)
    buffer.seek(0)
    resumed = IncrementalMM(_model("hierarchical"), polyak_start=3)
    resumed.load_state_dict(torch.load(buffer))
    for batch in batches[6:]:
        resumed.step(*batch)
    for name in ("params", "averaged_params", "statistics"):
        left = getattr(infer, name)
        right = getattr(resumed, name)
        assert type(left.gate) is type(right.gate)
        for a, b in zip(tree_leaves(left), tree_leaves(right), strict=True):
            assert torch.equal(a, b)
    buffer.seek(0)
    state = torch.load(buffer)
    other = IncrementalMM(GaussianMoE(6, 2, gate=HierarchicalGate(num_groups=3, group_size=2)))
    with pytest.raises(ValueError, match="gate"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="gate"):
        IncrementalMM(GaussianMoE(6, 2)).load_state_dict(state)


def test_em_checkpoint_records_the_gate():
    x, y, _ = _hierarchical_data(300, seed=8)
    em = EM(GaussianMoE(6, 2, gate=TemperatureGate(0.5)))
    em.step(x, y)
    state = em.state_dict()
    with pytest.raises(ValueError, match="TemperatureGate"):
        EM(GaussianMoE(6, 2, gate=TemperatureGate(2.0))).load_state_dict(state)
    resumed = EM(GaussianMoE(6, 2, gate=TemperatureGate(0.5)))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.params.gate, em.params.gate)


# ---------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: GaussianMoE(4, 2, gate=HierarchicalGate(2, 3)), ValueError, "num_experts=4"),
        (lambda: HierarchicalGate(num_groups=1, group_size=3), ValueError, "num_groups"),
        (lambda: HierarchicalGate(num_groups=2, group_size=1), ValueError, "group_size"),
        (lambda: HierarchicalGate(num_groups=2.0, group_size=3), ValueError, "num_groups"),
        (lambda: TemperatureGate(temperature=0.0), ValueError, "temperature"),
        (lambda: TemperatureGate(temperature=-1.0), ValueError, "temperature"),
        (lambda: TemperatureGate(temperature=float("nan")), ValueError, "temperature"),
        (lambda: TemperatureGate(temperature=float("inf")), ValueError, "temperature"),
        (lambda: TemperatureGate(temperature="hot"), ValueError, "temperature"),
        (lambda: GaussianMoE(2, 2, gate="softmax"), TypeError, "gate must be"),
        (
            lambda: IncrementalMM(_model("hierarchical"), gate_bound="jaakkola-jordan"),
            ValueError,
            "constant softmax bound",
        ),
        (
            lambda: IncrementalMM(_model("temperature"), gate_penalty=CoefficientPenalty(l1=0.1)),
            ValueError,
            "gate_penalty",
        ),
    ],
)
def test_bad_gate_options_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_spectral_init_refuses_another_gate():
    x, y, _ = _hierarchical_data(300, seed=9)
    model = GaussianMoE(2, 2, gate=TemperatureGate(0.5))
    with pytest.raises(ValueError, match="one-level softmax gate"):
        EM(model, init="spectral").step(x, y)


def test_the_default_gate_is_the_softmax_gate():
    model = GaussianMoE(3, 2)
    assert model.gate == SoftmaxGate() and model.gate.param_names == ("gate_weight",)
    assert isinstance(model.get_params().gate, torch.Tensor)


# ---------------------------------------------------------------------------- diagnostics
def test_inference_data_laplace_and_bic_count_the_hierarchical_gate():
    from pyro_mm.diagnostics import laplace_posterior, num_free_parameters, to_inference_data

    x, y, truth = _hierarchical_data(400, seed=10)
    model = _model("hierarchical").double()
    model.set_params(truth)
    laplace = laplace_posterior(model, x, y)
    assert laplace.sites.names[:2] == ("gate_outer", "gate_inner")
    idata = to_inference_data(model, x, y, laplace, num_samples=20)
    assert idata.posterior["gate_inner"].dims == (
        "chain",
        "draw",
        "gate_inner_dim_0",
        "gate_inner_dim_1",
        "gate_features",
    )
    assert idata.log_likelihood["y"].shape == (1, 20, 400)
    # (J - 1) D_g + J (I - 1) D_g gate weights, K Q D_e expert weights, K Q variances.
    assert num_free_parameters(model) == 1 * 3 + 2 * 2 * 3 + 6 * 3 + 6


@pytest.mark.parametrize("kind", sorted(GATES))
def test_multinomial_experts_take_a_gate(kind):
    from pyro_mm import MultinomialMoE

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(500, 2, generator=generator, dtype=torch.float64)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()).clamp_max(2)
    model = MultinomialMoE(6, 2, 3, gate=GATES[kind]()).double()
    em = EM(model)
    losses = [em.step(x, y) for _ in range(10)]
    assert all(b <= a + 1e-10 for a, b in zip(losses, losses[1:]))
    assert torch.allclose(model.predict(x).sum(-1), torch.ones(500).double())
    trace = pyro.poutine.trace(model).get_trace(x, y)
    assert torch.allclose(trace.nodes["y"]["fn"].log_prob(y), model.log_prob(x, y), atol=1e-12)
    assert Predictive(model, num_samples=2)(x)["y"].shape == (2, 500)
    infer = IncrementalMM(model, init="current")
    assert all(
        math.isfinite(infer.step(x[i : i + 100], y[i : i + 100])) for i in range(0, 500, 100)
    )


# ---------------------------------------------------------------------------- distributed
def _rank_batch(step, rank):
    x, y, _ = _hierarchical_data(2 * 8 * 150, seed=12)
    start = (2 * step + rank) * 150 - 20 * rank  # unequal shard sizes
    return x[start : start + 150 - 20 * rank], y[start : start + 150 - 20 * rank]


def _distributed_worker(rank, out_dir):
    import os

    import torch.distributed as dist

    init_local_gloo(rank, os.path.join(out_dir, "store"), 2)
    try:
        # A given start: K-means on one rank's batch would differ from the one process's.
        model = _perturbed_start(_model("hierarchical").double())
        infer = IncrementalMM(model, init="current", polyak_start=3)
        for step in range(8):
            infer.step(*_rank_batch(step, rank))
        torch.save(infer.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_incremental_mm_with_a_hierarchical_gate_is_one_process(tmp_path):
    import torch.multiprocessing as mp

    from pyro_mm.infer.state import load_tree_state

    mp.spawn(_distributed_worker, args=(str(tmp_path),), nprocs=2, join=True)
    model = _perturbed_start(_model("hierarchical").double())
    single = IncrementalMM(model, init="current", polyak_start=3, process_group=False)
    for step in range(8):
        parts = [_rank_batch(step, rank) for rank in range(2)]
        single.step(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    expected = load_tree_state(single.state_dict())
    for rank in range(2):
        state = load_tree_state(torch.load(tmp_path / f"rank{rank}.pt"))
        for name in ("params", "averaged_params", "statistics"):
            pairs = zip(tree_leaves(state[name]), tree_leaves(expected[name]), strict=True)
            assert max(float((a - b).abs().max()) for a, b in pairs) < 1e-10, name


def test_parameter_error_refuses_a_structured_gate_with_a_clear_error():
    from pyro_mm.metrics import parameter_error

    model = GaussianMoE(6, 2, gate=HierarchicalGate(num_groups=2, group_size=3)).double()
    params = model.get_params()
    with pytest.raises(TypeError, match="one-level gate weights"):
        parameter_error(params, params)
