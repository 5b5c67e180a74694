"""Step-size schedules: values, checks, checkpointing, and what the decaying tail buys."""

import math

import pytest
import torch

from pyro_mm import ConstantStep, ConstantThenDecay, IncrementalMM, MultinomialMoE
from pyro_mm.datasets.synthetic import multinomial_moe_truth, sample_multinomial_moe
from pyro_mm.infer.state import load_schedule_state, schedule_state
from pyro_mm.init import kmeans_init
from pyro_mm.surrogates.penalties import CoefficientPenalty


def test_constant_then_decay_values():
    schedule = ConstantThenDecay(0.4, decay_start=10, alpha=0.75)
    steps = [schedule(n) for n in range(1, 200)]
    assert steps[:10] == [0.4] * 10
    assert schedule(40) == pytest.approx(0.4 * (10 / 40) ** 0.75, rel=1e-15)
    assert all(b <= a for a, b in zip(steps, steps[1:]))
    # continuous at the switch, and Robbins-Monro in the tail: the steps add up (slowly)
    assert schedule(11) == pytest.approx(0.4, rel=0.1)
    assert sum(ConstantThenDecay(1.0, 1, 1.0)(n) for n in range(1, 10_001)) > math.log(10_000)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"decay_start": 0}, "decay_start"),
        ({"decay_start": 2.5}, "decay_start"),
        ({"decay_start": True}, "decay_start"),
        ({"alpha": 0.5}, "alpha"),
        ({"alpha": 1.2}, "alpha"),
    ],
)
def test_constant_then_decay_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        ConstantThenDecay(**options)


def test_constant_then_decay_is_rebuilt_from_a_checkpoint():
    schedule = ConstantThenDecay(0.3, decay_start=25, alpha=0.6)
    state = schedule_state(schedule)
    rebuilt = load_schedule_state(ConstantStep(1.0), state)
    assert isinstance(rebuilt, ConstantThenDecay)
    assert [rebuilt(n) for n in range(1, 60)] == [schedule(n) for n in range(1, 60)]


def _penalised_objective(model, x, y, l2):
    with torch.no_grad():
        penalty = sum(p.square().sum() for p in model.parameters()).item()
        return -model.log_prob(x, y).mean().item() + 0.5 * l2 * penalty


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_decaying_tail_fits_better_than_the_constant_step(seed):
    """Same constant phase, same Polyak tail (the last quarter): decaying the step after the
    constant phase reaches a lower penalised objective than keeping it constant (with batches of
    8 rows the constant step's statistics average only the last few batches)."""
    truth = multinomial_moe_truth(3, 2, 3, gate_norm=2.0, expert_scale=2.0, seed=0)
    x, y = sample_multinomial_moe(truth, 1500, seed=seed)
    l2, batch_size, epochs, gamma = 1e-3, 8, 4, 0.8
    steps = epochs * len(x) // batch_size
    start = MultinomialMoE(3, 2, 3).double()
    start.set_params(kmeans_init(start, x, y, seed=0))
    params = start.get_params()

    def fit(schedule):
        model = MultinomialMoE(3, 2, 3).double()
        model.set_params(params)
        infer = IncrementalMM(
            model,
            schedule=schedule,
            polyak_start=3 * steps // 4,
            ridge=l2,
            gate_penalty=CoefficientPenalty(l2=l2, intercept_column=None),
            init="current",
        )
        infer.fit(x, y, batch_size=batch_size, epochs=epochs, progress=False)
        return _penalised_objective(model, x, y, l2)

    constant = fit(ConstantStep(gamma))
    decaying = fit(ConstantThenDecay(gamma, decay_start=steps // 2, alpha=0.75))
    assert decaying < constant - 1e-3
