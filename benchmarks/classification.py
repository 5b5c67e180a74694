"""Classification: a softmax-gated multinomial-logistic MoE (the incremental-MM paper's Section 4.2,
Algorithm 3) fitted by every method at equal samples seen.

Data sets:

* ``synthetic``: a seeded MoE classification stream, :func:`pyro_mm.datasets.synthetic.
  multinomial_moe_truth` ``(K=3, P=4, M=4, gate_norm=3, expert_scale=2, seed=0)``; repetition
  ``s`` trains on :func:`~pyro_mm.datasets.synthetic.sample_multinomial_moe` with
  ``seed=1 + 1000 s`` (``--synthetic-rows`` rows, ``x ~ N(0, I)``), 3 passes; the test set is
  20 000 rows with ``seed=2``;
* ``synthetic_stream``: the same truth and test set, but the stream setting of the paper's
  Algorithm 3: ``--stream-rows`` fresh rows (seed as above), each seen once (one pass);
* ``iris``, ``wine``, ``breast_cancer``, ``digits``: shipped inside scikit-learn (no download);
  repetition ``s`` uses a stratified 70/30 train/test split with ``random_state=s``, inputs
  standardised with the training rows' mean and standard deviation (constant columns kept at 0).

Protocol, per data set and repetition ``s`` (``--repetitions`` seeds from ``--seed``):

* model ``MultinomialMoE(K, P, M)``, gate and expert degree 1 (``K = 3`` as in the truth for the
  synthetic data, ``--experts`` for the real ones);
* one common start for every method: K-means (10 restarts, seed ``s``) on the training rows,
  experts from one MM solve on their clusters, gate at zero (:func:`pyro_mm.init.kmeans_init`);
* the training rows are shuffled once (seed ``s``) and every method gets the same budget of
  passes over them (:data:`EPOCHS`), i.e. the same number of samples seen: the streaming methods
  take mini-batches of ``B`` rows (:data:`BATCH_SIZES`) in that order, EM one full-data
  iteration per pass; MirrorDescentEM takes ``max(B, 4 D_e)`` rows per step (it needs batches
  well above the number ``D_e`` of expert features);
* the objective: every method minimises the same penalised objective, the mean NLL plus
  ``lambda/2 (||W||^2 + sum_k ||V_k||^2)`` on all gate and expert weights (intercepts included):
  MM and FiniteSumMM through their expert ``ridge`` and ``gate_penalty``, EM and MirrorDescentEM
  through ``ridge`` and ``gate_ridge``, the gradient methods through their loss
  (:class:`L2PenalisedELBO`). One ``lambda`` per data set is chosen from :data:`L2_GRID` on the
  first repetition by the validation NLL of the objective's minimiser (EM run to convergence
  on the same 80/20 split as the step sizes, :func:`choose_l2`: no compared stochastic method is
  involved), before the step sizes are tuned, and reused (``--l2`` fixes it instead);
* methods: incremental MM in two forms, (a) ``FiniteSumMM`` (:class:`pyro_mm.FiniteSumMM`:
  the statistics of each mini-batch are kept and replaced when the batch comes again, so after
  one pass the surrogate majorises the full-data objective; no step size) and (b)
  ``IncrementalMM`` (stochastic approximation of the statistics with the step ``gamma``
  constant over the first half of the steps, then decaying as ``gamma (n_half / n)^0.75``
  (:class:`pyro_mm.ConstantThenDecay`), the iterates Polyak-averaged over the last quarter of
  the steps);
  each with the expert bound of :data:`MM_EXPERT_BOUNDS` chosen on the validation split
  (for (b) with its step, for (a) with its number of MM iterations per batch from
  :data:`FINITE_SUM_INNER_STEPS`, :func:`choose_finite_sum_options`), Jaakkola-Jordan for
  a two-expert gate, else Böhning; EM (exact Newton M-steps),
  stochastic MirrorDescentEM (``eta_n = n^-alpha``; its expert step is an MM step, with the
  expert bound of :data:`MM_EXPERT_BOUNDS` chosen on the validation split with ``alpha``), and
  SGD, Adam, AdamW and RMSProp (:class:`pyro_mm.infer.svi_fit.SVIFit`: Pyro's ELBO with an
  empty guide, i.e. the mean NLL of each mini-batch, plus the penalty);
* step sizes: every stochastic method's step-size parameter (the learning rate; ``gamma`` in
  :data:`MM_STEP_GRID` for MM, ``alpha`` in :data:`SCHEDULE_GRID` for MirrorDescentEM) is chosen
  from its grid by the NLL of a 20% validation split of the first repetition's training rows,
  fitted with the same budget and penalty (:func:`pyro_mm.infer.compare.tune_learning_rate`),
  and reused in the other repetitions; incremental MM's and MirrorDescentEM's expert bounds
  are chosen with their steps, from the same searches (the lowest validation NLL over bounds
  and steps, :data:`BOUND_CHOOSING_METHODS`);
* also reported: EM run to convergence (``EM (converged)``: until the mean NLL changes by less
  than :data:`EM_TOL` in an iteration, at most ``--em-max-iter`` iterations; the table says how many
  repetitions converged before the cap; its samples seen are larger);
* metrics on the test rows: accuracy (argmax of ``p(y | x)``), log-loss (mean NLL), the fit's
  wall time (tuning excluded), one thread; mean (sd) over repetitions, and the acceptance checks
  (incremental MM within 2% of EM, below every gradient method) on the means and per repetition,
  for each incremental-MM form.

Run ``python benchmarks/classification.py --help`` for the options.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import sys
import time
import warnings
from typing import Dict, List

import numpy as np
import torch
from pyro.infer import Trace_ELBO

from pyro_mm import (
    EM,
    ConstantThenDecay,
    FiniteSumMM,
    IncrementalMM,
    MirrorDescentEM,
    MultinomialMoE,
    PowerDecay,
)
from pyro_mm.datasets.synthetic import multinomial_moe_truth, sample_multinomial_moe
from pyro_mm.infer.compare import (
    Method,
    fit_method,
    tune_learning_rate,
    validation_nll,
    validation_split,
)
from pyro_mm.infer.svi_fit import SVIFit
from pyro_mm.init import kmeans_init
from pyro_mm.metrics import mean_nll
from pyro_mm.surrogates.penalties import CoefficientPenalty

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DATASETS = ("synthetic", "synthetic_stream", "iris", "wine", "breast_cancer", "digits")
#: Mini-batch size per data set, the same for every streaming method. Small: every method,
#: incremental MM included, makes more progress per sample with more, smaller steps.
BATCH_SIZES = {
    "synthetic": 32,
    "synthetic_stream": 32,
    "iris": 8,
    "wine": 8,
    "breast_cancer": 16,
    "digits": 32,
}
#: Budget of passes over the training rows per data set (``--epochs`` overrides): a few passes
#: of the 20 000-row synthetic set, one of the synthetic stream (every row fresh), many of the
#: small real sets.
EPOCHS = {
    "synthetic": 3,
    "synthetic_stream": 1,
    "iris": 50,
    "wine": 50,
    "breast_cancer": 50,
    "digits": 50,
}
#: Learning-rate grids (widened at the ends a first run chose); a choice still at an end of its
#: grid is flagged in the table. The MM/MirrorDescentEM grid's lower end 0.51 is Robbins-Monro's.
GRADIENT_GRIDS = {
    "SGD": (torch.optim.SGD, (0.1, 0.3, 1.0, 3.0, 10.0)),
    "Adam": (torch.optim.Adam, (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)),
    "AdamW": (torch.optim.AdamW, (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)),
    "RMSProp": (torch.optim.RMSprop, (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)),
}


#: Exponents ``alpha`` of the step sizes ``eta_n = n^-alpha`` of stochastic MirrorDescentEM,
#: chosen like the learning rates (``(1/2, 1]``: Robbins-Monro).
SCHEDULE_GRID = (0.51, 0.6, 0.75)
#: Steps ``gamma`` of incremental MM's constant phase, chosen like the learning rates. A
#: constant step with Polyak averaging beat ``gamma_n = n^-alpha`` (alpha in SCHEDULE_GRID, an
#: earlier protocol) on every data set in a first measurement: decaying steps add up to only
#: ``~n^{1-alpha} / (1-alpha)`` batch-MM iterations within the budget. Decaying the step after a
#: constant phase (:data:`MM_DECAY_FRACTION`) keeps that distance travelled and removes the
#: constant step's noise floor (statistics averaging only the last ``~1 / gamma`` batches).
MM_STEP_GRID = (0.05, 0.1, 0.2, 0.4, 0.8)
#: Share of incremental MM's steps taken with the constant step ``gamma``; after it the step
#: decays as ``gamma (n_0 / n)^alpha`` with :data:`MM_DECAY_EXPONENT` (Robbins-Monro, and with
#: ``alpha < 1`` the Polyak-Ruppert regime for the averaged tail). Chosen, with
#: :data:`POLYAK_FRACTION`, from the validation NLL and the penalised training objective of the
#: first repetition's tuning split (decay at 1/4 or 1/2 of the steps, alpha 0.75 or 1, average
#: over the last half or quarter): on that split, with the gamma tuned before, the validation
#: NLL went from 0.8021 to 0.7983 (synthetic), 0.0858 to 0.0842 (iris), 0.0255 to 0.0252
#: (wine), 0.0562 to 0.0551 (breast cancer), 0.1194 to 0.1150 (digits).
MM_DECAY_FRACTION = 0.5
MM_DECAY_EXPONENT = 0.75
#: Strengths ``lambda`` of the L2 penalty ``lambda/2 (||W||^2 + sum_k ||V_k||^2)`` on every
#: weight (gate and experts, intercepts included) that every method adds to the mean NLL; one is
#: chosen per data set by the validation NLL of the penalised objective's minimiser (EM run to
#: convergence), see :func:`choose_l2`.
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: ``EM (converged)`` stops when the mean NLL changes by less than this in an iteration.
EM_TOL = 1e-8
#: The two incremental-MM rows, each checked against the acceptance: the finite-sum variant
#: (:class:`pyro_mm.FiniteSumMM`) and the stochastic-approximation one (the paper's
#: Algorithm 3, :class:`pyro_mm.IncrementalMM`).
MM_VARIANTS = ("FiniteSumMM", "IncrementalMM")
#: Share of incremental MM's steps before the Polyak average starts (the tail, after the
#: step has decayed for a while, is averaged).
POLYAK_FRACTION = 0.75
#: Expert bounds incremental MM (and MirrorDescentEM, whose multinomial expert step is an MM
#: step) chooses from on the validation split: the tighter per-sample Jebara-Choromanska bound
#: fits faster; Böhning's slower steps can overfit less in the budget.
MM_EXPERT_BOUNDS = ("jebara-choromanska", "bohning")
#: The methods that choose their expert bound from :data:`MM_EXPERT_BOUNDS` with their step size
#: (FiniteSumMM chooses its own with its inner steps, :func:`choose_finite_sum_options`).
BOUND_CHOOSING_METHODS = ("IncrementalMM", "MirrorDescentEM")
#: FiniteSumMM's ``inner_steps`` (MM iterations per batch, each re-anchoring the batch's own
#: term; the batch's samples count once) it chooses from with its expert bound on the
#: validation split. On the first repetition's tuning split, 3 iterations lowered FiniteSumMM's
#: validation NLL on every data set (its expert bound as IncrementalMM's): 0.8935 to 0.8631
#: (synthetic), 0.0963 to 0.0959 (iris), 0.0373 to 0.0282 (wine), 0.0538 to 0.0510 (breast
#: cancer), 0.1289 to 0.1174 (digits), at three times the compute.
FINITE_SUM_INNER_STEPS = (1, 3)


@dataclasses.dataclass
class Dataset:
    """A classification problem split into training and test rows.

    :ivar str name: label in the tables.
    :ivar x_train: ``(N, P)`` float64 training inputs, in the (shuffled) order they are fed.
    :ivar y_train: ``(N,)`` int64 labels.
    :ivar x_test: test inputs.
    :ivar y_test: test labels.
    :ivar int num_experts: ``K``.
    :ivar int num_classes: ``M``.
    :ivar float truth_log_loss: test log-loss of the true parameters (synthetic data only).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_experts: int
    num_classes: int
    truth_log_loss: float = None


def load_dataset(name: str, seed: int, args) -> Dataset:
    """The data set ``name`` for repetition ``seed``: a fresh training stream (synthetic) or a
    fresh stratified split (real), as described in the module docstring."""
    if name in ("synthetic", "synthetic_stream"):
        truth = multinomial_moe_truth(3, 4, 4, gate_norm=3.0, expert_scale=2.0, seed=0)
        rows = args.synthetic_rows if name == "synthetic" else args.stream_rows
        x_train, y_train = sample_multinomial_moe(truth, rows, seed=1 + 1000 * seed)
        x_test, y_test = sample_multinomial_moe(truth, 20_000, seed=2)
        reference = MultinomialMoE(3, 4, 4).double()
        truth_loss = -reference.log_prob(x_test, y_test, truth).mean().item()
        return Dataset(name, x_train, y_train, x_test, y_test, 3, 4, truth_loss)
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    x, y = getattr(sklearn.datasets, "load_" + name)(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=seed
    )
    mean, scale = x_train.mean(0), x_train.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    x_train, x_test = (x_train - mean) / scale, (x_test - mean) / scale
    order = np.random.default_rng(seed).permutation(len(x_train))
    return Dataset(
        name,
        torch.as_tensor(x_train[order], dtype=torch.float64),
        torch.as_tensor(y_train[order], dtype=torch.int64),
        torch.as_tensor(x_test, dtype=torch.float64),
        torch.as_tensor(y_test, dtype=torch.int64),
        args.experts,
        int(y.max()) + 1,
    )


class OwnBatchSize:
    """Runs a streaming fitter with its own mini-batch size whatever a comparison asks for (the
    budget of passes, hence of samples seen, is unchanged).

    :param fitter: an object with ``fit(x, y, *, batch_size, epochs, progress)``.
    :param int batch_size: the rows per step it uses.
    """

    def __init__(self, fitter, batch_size: int):
        self.fitter = fitter
        self.batch_size = batch_size

    def fit(self, x, y, *, batch_size=None, epochs: int = 1, progress: bool = False):
        return self.fitter.fit(x, y, batch_size=self.batch_size, epochs=epochs, progress=progress)


class TailAveraged:
    """Runs an :class:`~pyro_mm.infer.IncrementalMM` whose step is ``gamma`` over the first
    ``decay_fraction`` of the steps of its fit and then decays
    (:class:`~pyro_mm.ConstantThenDecay`), with Polyak averaging over the last
    ``1 - fraction`` of the steps. Both starts are set from the rows it is given, so the tuning
    fits on fewer rows decay and average the same shares of their steps.

    :param IncrementalMM fitter: the fitter.
    :param float gamma: the constant phase's step.
    :param float fraction: share of the steps before the average starts.
    :param float decay_fraction: share of the steps with the constant step.
    :param float alpha: the decay exponent.
    """

    def __init__(
        self, fitter: IncrementalMM, gamma: float, fraction: float, decay_fraction: float, alpha
    ):
        self.fitter = fitter
        self.gamma, self.fraction = gamma, fraction
        self.decay_fraction, self.alpha = decay_fraction, alpha

    def fit(self, x, y, *, batch_size, epochs: int = 1, progress: bool = False):
        steps = epochs * -(-len(x) // batch_size)
        self.fitter.schedule = ConstantThenDecay(
            self.gamma, max(1, int(self.decay_fraction * steps)), self.alpha
        )
        self.fitter.polyak_start = max(1, int(self.fraction * steps))
        return self.fitter.fit(x, y, batch_size=batch_size, epochs=epochs, progress=progress)


class L2PenalisedELBO(Trace_ELBO):
    """Pyro's ELBO plus ``l2/2`` times the squared norm of every parameter of ``model``.

    :class:`~pyro_mm.infer.svi_fit.SVIFit` divides the ELBO by the data-set size, so with an
    empty guide it minimises the mini-batch's mean NLL plus ``l2/2 (||W||^2 + sum_k ||V_k||^2)``:
    the per-batch version of the penalised objective MM, EM and MirrorDescentEM minimise (the
    parameters of a ``MultinomialMoE`` are real, so its stored parameters are the weights).

    :param model: the ``MultinomialMoE`` being fitted.
    :param float l2: ``lambda``.
    """

    def __init__(self, model, l2: float):
        super().__init__()
        names = {name for name, _ in model.named_parameters()}
        if names != {"gate_weight_unconstrained", "expert_weight_unconstrained"}:
            raise ValueError(f"expected the gate and expert weights only, got {sorted(names)}")
        self.model = model
        self.l2 = float(l2)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        penalty = sum(p.square().sum() for p in self.model.parameters())
        return loss + 0.5 * self.l2 * penalty


def gate_l2_penalty(l2: float) -> CoefficientPenalty:
    """The gate term ``l2/2 ||W||^2`` of incremental MM (every column, intercept included, as
    EM's ``gate_ridge`` and the experts' ``ridge``)."""
    return CoefficientPenalty(l2=l2, intercept_column=None)


def em_to_convergence(make_model, init_params, l2: float):
    """``(model, em)``: EM on a fresh model at ``init_params`` for the penalised objective with
    strength ``l2``, stopping at :data:`EM_TOL` (the ``EM (converged)`` fits and :func:`choose_l2`;
    the caller runs ``em.fit`` with its iteration cap)."""
    model = make_model().double()
    model.set_params(init_params)
    return model, EM(model, tol=EM_TOL, ridge=l2, gate_ridge=l2, init="current")


def choose_l2(make_model, x, y, *, init_params, grid, seed: int, max_iter: int):
    """The L2 strength of :data:`L2_GRID` whose penalised objective generalises best.

    The same 80/20 split as :func:`~pyro_mm.infer.compare.tune_learning_rate` (rows shuffled
    with ``seed``, the last 20% held out); for each ``lambda`` the minimiser of the penalised
    objective on the other rows is found by EM run to convergence from ``init_params`` (no
    stochastic method is involved), and the ``lambda`` with the lowest validation NLL wins.

    :returns: ``(lambda, {"grid": ..., "validation_nll": ..., "em_iterations": ...})``.
    """
    fit_rows, valid_rows = validation_split(len(x), seed=seed)
    scores, iterations = [], []
    for l2 in grid:
        model, em = em_to_convergence(make_model, init_params, l2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            em.fit(x[fit_rows], y[fit_rows], max_iter=max_iter, progress=False)
        scores.append(mean_nll(model, x[valid_rows], y[valid_rows]))
        iterations.append(em.num_iterations)
    best = grid[min(range(len(grid)), key=scores.__getitem__)]
    return float(best), {
        "grid": [float(v) for v in grid],
        "validation_nll": scores,
        "em_iterations": iterations,
    }


def choose_finite_sum_options(
    candidates: Dict[tuple, Method], make_model, x, y, *, init_params, batch_size, epochs, seed
):
    """FiniteSumMM's expert bound and inner steps: the candidate with the lowest validation
    NLL, each fitted with the final fit's budget on the rows of the step sizes' split
    (:func:`~pyro_mm.infer.compare.validation_split`). FiniteSumMM has no step size.

    :param dict candidates: ``{(expert bound, inner steps): Method}``.
    :returns: ``((bound, inner steps), {"candidates": ..., "validation_nll": ...,
        "expert_bound": ..., "inner_steps": ...})``.
    """
    split = validation_split(len(x), seed=seed)
    scores = [
        validation_nll(
            method,
            make_model,
            x,
            y,
            split,
            init_params=init_params,
            batch_size=batch_size,
            epochs=epochs,
        )
        for method in candidates.values()
    ]
    options = list(candidates)
    best = options[min(range(len(options)), key=scores.__getitem__)]
    return best, {
        "candidates": [list(option) for option in options],
        "validation_nll": scores,
        "expert_bound": best[0],
        "inner_steps": best[1],
    }


def candidate_name(method: str, bound: str) -> str:
    """Name of ``method``'s candidate with the expert bound ``bound`` (tuning only)."""
    return f"{method}[{bound}]"


def mm_gate_bound(num_experts: int) -> str:
    """The gate bound of both incremental-MM forms: Jaakkola-Jordan for two experts, else
    Böhning."""
    return "jaakkola-jordan" if num_experts == 2 else "bohning"


def build_methods(l2: float, mirror_batch_size: int, seed: int, num_experts: int) -> List[Method]:
    """The compared methods, as :class:`pyro_mm.infer.compare.Method` s; a method's "learning
    rate" is its step-size parameter (MM's constant step, MirrorDescentEM's exponent). Each of
    :data:`BOUND_CHOOSING_METHODS` comes once per expert bound of :data:`MM_EXPERT_BOUNDS`
    (:func:`candidate_name`); the caller keeps the one with the lowest validation NLL under the
    method's own name.

    :param float l2: the L2 strength ``lambda`` every method's objective carries.
    :param int mirror_batch_size: MirrorDescentEM's rows per step.
    :param int seed: seed of the gradient methods' ELBO draws.
    :param int num_experts: ``K`` (a two-expert gate takes the Jaakkola-Jordan bound).
    """
    gate_bound = mm_gate_bound(num_experts)

    def incremental_mm(bound):
        def build(model, gamma):
            fitter = IncrementalMM(
                model,
                schedule=ConstantThenDecay(gamma),
                ridge=l2,
                gate_penalty=gate_l2_penalty(l2),
                gate_bound=gate_bound,
                expert_bound=bound,
            )
            return TailAveraged(
                fitter, gamma, POLYAK_FRACTION, MM_DECAY_FRACTION, MM_DECAY_EXPONENT
            )

        return build

    def mirror_descent(bound):
        def build(model, alpha):
            fitter = MirrorDescentEM(
                model, PowerDecay(1.0, alpha), ridge=l2, gate_ridge=l2, expert_bound=bound
            )
            return OwnBatchSize(fitter, mirror_batch_size)

        return build

    def gradient(optimizer):
        def build(model, learning_rate):
            return SVIFit(
                model,
                optim=optimizer,
                optim_args={"lr": learning_rate},
                loss=L2PenalisedELBO(model, l2),
                seed=seed,
            )

        return build

    methods = [
        Method(candidate_name("IncrementalMM", bound), incremental_mm(bound), MM_STEP_GRID)
        for bound in MM_EXPERT_BOUNDS
    ]
    methods.append(Method("EM", lambda model: EM(model, ridge=l2, gate_ridge=l2)))
    methods += [
        Method(candidate_name("MirrorDescentEM", bound), mirror_descent(bound), SCHEDULE_GRID)
        for bound in MM_EXPERT_BOUNDS
    ]
    for name, (optimizer, grid) in GRADIENT_GRIDS.items():
        methods.append(Method(name, gradient(optimizer), learning_rates=grid))
    return methods


def test_metrics(model, data: Dataset) -> Dict[str, float]:
    with torch.no_grad():
        probs = model.predict(data.x_test)
        log_loss = -model.log_prob(data.x_test, data.y_test).mean().item()
    accuracy = (probs.argmax(-1) == data.y_test).double().mean().item()
    return {"accuracy": accuracy, "log_loss": log_loss}


def run_repetition(data: Dataset, seed: int, args, tuned: Dict[str, float] = None) -> dict:
    """Every method on one repetition of a data set.

    :param dict tuned: ``{method: step-size parameter}`` chosen on an earlier repetition; the
        methods with a grid that are missing are tuned here on a validation split.
    :returns: a JSON-ready dict (rows, the searches run here, acceptance checks).
    """
    batch_size = BATCH_SIZES[data.name]
    epochs = EPOCHS[data.name] if args.epochs is None else args.epochs
    num_features = data.x_train.shape[1]
    make_model = functools.partial(MultinomialMoE, data.num_experts, num_features, data.num_classes)
    mirror_batch_size = max(batch_size, 4 * (num_features + 1))
    reference = make_model().double()
    start = time.perf_counter()
    init_params = kmeans_init(reference, data.x_train, data.y_train, seed=seed)
    init_seconds = time.perf_counter() - start
    reference.set_params(init_params)
    rows = [{"method": "K-means start", "samples_seen": 0, **test_metrics(reference, data)}]
    searches = {}
    if tuned is not None:
        l2 = tuned["L2"]
    elif args.l2 is not None:
        l2 = args.l2
    else:
        l2, searches["L2"] = choose_l2(
            make_model,
            data.x_train,
            data.y_train,
            init_params=init_params,
            grid=L2_GRID,
            seed=seed,
            max_iter=args.em_max_iter,
        )
        print(f"  {data.name:>14} seed {seed} L2 {l2:g}: {searches['L2']}", flush=True)
    methods = build_methods(l2, mirror_batch_size, seed, data.num_experts)
    # Every step-size search runs on the same rows, start and budget.
    # The training data and budget every fit, search and choice of this repetition shares.
    setting = {
        "make_model": make_model,
        "x": data.x_train,
        "y": data.y_train,
        "init_params": init_params,
        "batch_size": batch_size,
        "epochs": epochs,
    }
    tune = functools.partial(tune_learning_rate, **setting, seed=seed)
    # Each bound-choosing method: its (expert bound, step) with the lowest validation NLL.
    bounds, steps, chosen = {}, {}, {}
    for family in BOUND_CHOOSING_METHODS:
        candidates = {m.name: m for m in methods if m.name.startswith(family + "[")}
        if tuned is None:
            for name, method in candidates.items():
                searches[name] = dataclasses.asdict(tune(method))
            best = min(candidates, key=lambda name: min(searches[name]["validation_nll"]))
            bounds[family] = best[len(family) + 1 : -1]
            searches[family] = {**searches[best], "expert_bound": bounds[family]}
            steps[family] = searches[best]["best"]
        else:
            bounds[family], steps[family] = tuned[f"{family} expert bound"], tuned[family]
        chosen[family] = dataclasses.replace(
            candidates[candidate_name(family, bounds[family])], name=family
        )
    gate_bound = mm_gate_bound(data.num_experts)

    def finite_sum(bound, inner_steps):
        def build(model):
            return FiniteSumMM(
                model,
                ridge=l2,
                gate_penalty=gate_l2_penalty(l2),
                gate_bound=gate_bound,
                expert_bound=bound,
                inner_steps=inner_steps,
            )

        return Method("FiniteSumMM", build)

    if tuned is None:
        (finite_sum_bound, inner_steps), searches["FiniteSumMM"] = choose_finite_sum_options(
            {
                (bound, inner): finite_sum(bound, inner)
                for bound in MM_EXPERT_BOUNDS
                for inner in FINITE_SUM_INNER_STEPS
            },
            **setting,
            seed=seed,
        )
    else:
        finite_sum_bound = tuned["FiniteSumMM expert bound"]
        inner_steps = tuned["FiniteSumMM inner steps"]
    bounds["FiniteSumMM"] = finite_sum_bound
    # In the order of build_methods, each bound-choosing method in its first candidate's place.
    ordered = [finite_sum(finite_sum_bound, inner_steps)]
    for method in methods:
        family = method.name.split("[")[0]
        if family not in chosen:
            ordered.append(method)
        elif chosen[family] not in ordered:
            ordered.append(chosen[family])
    methods = ordered
    for method in methods:
        learning_rate = steps.get(method.name, (tuned or {}).get(method.name))
        if method.learning_rates and learning_rate is None:
            search = tune(method)
            searches[method.name] = dataclasses.asdict(search)
            learning_rate = search.best
        model, history, seconds, caught = fit_method(method, **setting, learning_rate=learning_rate)
        rows.append(
            {
                "method": method.name,
                "samples_seen": len(data.x_train) * epochs,
                "steps": len(history),
                "fit_seconds": seconds,
                "learning_rate": learning_rate,
                **({"expert_bound": bounds[method.name]} if method.name in bounds else {}),
                **({"inner_steps": inner_steps} if method.name == "FiniteSumMM" else {}),
                "warnings": sorted(set(caught)),
                **test_metrics(model, data),
            }
        )
        print(
            f"  {data.name:>14} seed {seed} {method.name:>16}: {rows[-1]['log_loss']:.4f}",
            flush=True,
        )
    converged, em = em_to_convergence(make_model, init_params, l2)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = em.fit(data.x_train, data.y_train, max_iter=args.em_max_iter, progress=False)
    rows.append(
        {
            "method": "EM (converged)",
            "samples_seen": history.samples_seen[-1],
            "steps": len(history),
            "fit_seconds": time.perf_counter() - start,
            "converged": em.converged,
            "last_change": abs(history.loss[-1] - history.loss[-2]) if len(history) > 1 else None,
            "warnings": sorted({str(w.message) for w in caught}),
            **test_metrics(converged, data),
        }
    )
    return {
        "seed": seed,
        "num_train": len(data.x_train),
        "num_test": len(data.x_test),
        "num_features": num_features,
        "num_classes": data.num_classes,
        "num_experts": data.num_experts,
        "batch_size": batch_size,
        "mirror_batch_size": mirror_batch_size,
        "epochs": epochs,
        "l2": l2,
        "init_seconds": init_seconds,
        "truth_log_loss": data.truth_log_loss,
        "rows": rows,
        "searches": searches,
        "acceptance": acceptances({row["method"]: row["log_loss"] for row in rows}),
    }


def acceptances(log_loss: Dict[str, float]) -> dict:
    """:func:`acceptance` of each incremental-MM variant of :data:`MM_VARIANTS`."""
    return {variant: acceptance(log_loss, variant) for variant in MM_VARIANTS}


def acceptance(log_loss: Dict[str, float], variant: str = "FiniteSumMM") -> dict:
    """Incremental MM's (``variant``'s) log-loss against EM's (relative gap, at equal samples
    seen and run to convergence) and against every gradient method at equal samples seen."""
    mm = log_loss[variant]
    gap = (mm - log_loss["EM"]) / log_loss["EM"]
    converged_gap = (mm - log_loss["EM (converged)"]) / log_loss["EM (converged)"]
    return {
        "relative_gap_to_em": gap,
        "relative_gap_to_converged_em": converged_gap,
        "within_2_percent_of_em": gap <= 0.02,
        "within_2_percent_of_converged_em": converged_gap <= 0.02,
        "best_gradient_method": min(GRADIENT_GRIDS, key=log_loss.__getitem__),
        "below_every_gradient_method": all(mm < log_loss[name] for name in GRADIENT_GRIDS),
    }


def method_rows(repetitions: List[dict], method: str) -> List[dict]:
    """The row of ``method`` in each repetition."""
    return [next(row for row in rep["rows"] if row["method"] == method) for rep in repetitions]


def run_dataset(name: str, args) -> dict:
    """All repetitions of one data set: step sizes tuned on the first, reused on the others."""
    repetitions, tuned = [], None
    for seed in range(args.seed, args.seed + args.repetitions):
        repetition = run_repetition(load_dataset(name, seed, args), seed, args, tuned)
        if tuned is None:
            tuned = {
                row["method"]: row["learning_rate"]
                for row in repetition["rows"]
                if row.get("learning_rate") is not None
            }
            for family in BOUND_CHOOSING_METHODS:
                tuned[f"{family} expert bound"] = repetition["searches"][family]["expert_bound"]
            finite_sum = repetition["searches"]["FiniteSumMM"]
            tuned["FiniteSumMM expert bound"] = finite_sum["expert_bound"]
            tuned["FiniteSumMM inner steps"] = finite_sum["inner_steps"]
            tuned["L2"] = repetition["l2"]
        repetitions.append(repetition)
    methods = [row["method"] for row in repetitions[0]["rows"]]
    summary = {}
    for method in methods:
        rows = method_rows(repetitions, method)
        summary[method] = {
            key: (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows])))
            for key in ("log_loss", "accuracy", "samples_seen")
        }
        if method != "K-means start":
            seconds = [r["fit_seconds"] for r in rows]
            summary[method]["fit_seconds"] = (float(np.mean(seconds)), float(np.std(seconds)))
    mean_log_loss = {method: summary[method]["log_loss"][0] for method in methods}
    return {
        "dataset": name,
        "tuned": tuned,
        "searches": repetitions[0]["searches"],
        "repetitions": repetitions,
        "summary": summary,
        "acceptance_on_means": acceptances(mean_log_loss),
        "acceptance_per_repetition": [rep["acceptance"] for rep in repetitions],
    }


def _cell(pair, digits=4) -> str:
    mean, sd = pair
    return f"{mean:.{digits}f} ({sd:.{digits}f})"


def markdown(results: List[dict], args) -> str:
    lines = []
    for result in results:
        first = result["repetitions"][0]
        truth = first["truth_log_loss"]
        lines += [
            "",
            f"### {result['dataset']}: N_train={first['num_train']}, N_test={first['num_test']}, "
            f"P={first['num_features']}, M={first['num_classes']}, K={first['num_experts']}; "
            f"{first['epochs']} pass{'' if first['epochs'] == 1 else 'es'}, batches of "
            f"{first['batch_size']} rows "
            f"(MirrorDescentEM: {first['mirror_batch_size']}); L2 strength {first['l2']:g}"
            + ("" if truth is None else f"; test log-loss of the true parameters {truth:.4f}"),
            "",
            f"Mean (sd) over {args.repetitions} repetitions.",
            "",
            "| method | samples seen | test accuracy | test log-loss | fit time (s) | "
            "step size (grid) |",
            "|---|---|---|---|---|---|",
        ]
        for method, summary in result["summary"].items():
            search = result["searches"].get(method)
            chosen = result["tuned"].get(method)
            step = ""
            if chosen is not None:
                step = f"{chosen:g} ({', '.join(f'{v:g}' for v in search['grid'])})"
                if chosen in (search["grid"][0], search["grid"][-1]):
                    step += " at the grid's end"
                if method in BOUND_CHOOSING_METHODS:
                    step = "gamma " + step if method == "IncrementalMM" else "alpha " + step
                    if "expert_bound" in search:  # not in results from before the choice
                        step += f", {search['expert_bound']} expert bound"
            if method == "FiniteSumMM":
                step = (
                    f"{result['tuned']['FiniteSumMM expert bound']} expert bound, "
                    f"{result['tuned']['FiniteSumMM inner steps']} MM iterations per batch"
                )
            if method == "EM (converged)":
                step = _convergence_cell(result, args)
            seconds = summary.get("fit_seconds")
            lines.append(
                f"| {method} | {summary['samples_seen'][0]:.0f} | {_cell(summary['accuracy'])} | "
                f"{_cell(summary['log_loss'])} | "
                f"{'' if seconds is None else _cell(seconds, 2)} | {step} |"
            )
        for variant in MM_VARIANTS:
            lines += _acceptance_lines(result, variant)
        lines += _minimiser_lines(result)
        lines += [
            *_bound_search_lines(result, "Incremental MM", "IncrementalMM", "gamma"),
            *_bound_search_lines(result, "MirrorDescentEM", "MirrorDescentEM", "alpha"),
            "",
            "FiniteSumMM's validation NLL per expert bound and MM iterations per batch: "
            + ", ".join(
                f"{bound} x{inner} {nll:.4f}"
                for (bound, inner), nll in zip(
                    result["searches"]["FiniteSumMM"]["candidates"],
                    result["searches"]["FiniteSumMM"]["validation_nll"],
                    strict=True,
                )
            )
            + ".",
        ]
        if "L2" in result["searches"]:
            search = result["searches"]["L2"]
            lines += [
                "",
                "Validation NLL of the penalised objective's minimiser (EM to convergence) per L2 "
                "strength "
                + ", ".join(
                    f"{l2:g}: {nll:.4f}"
                    for l2, nll in zip(search["grid"], search["validation_nll"], strict=True)
                )
                + ".",
            ]
    return "\n".join(lines)


def _convergence_cell(result: dict, args) -> str:
    """How many repetitions' ``EM (converged)`` met the tolerance before the iteration cap
    (with the last change of the mean NLL where the results record it)."""
    rows = method_rows(result["repetitions"], "EM (converged)")
    cell = (
        f"converged in {sum(r['converged'] for r in rows)}/{len(rows)} repetitions "
        f"(mean-NLL change < {EM_TOL:g}; cap {args.em_max_iter} iterations)"
    )
    changes = [r.get("last_change") for r in rows if not r["converged"]]
    changes = [change for change in changes if change is not None]
    if changes:
        cell += f"; last change at the cap up to {max(changes):.1e}"
    return cell


def _bound_search_lines(result: dict, label: str, family: str, step: str) -> List[str]:
    """The validation NLL of ``family`` per step size and expert bound (when it was searched:
    results from before MirrorDescentEM chose its bound have no per-bound searches)."""
    searches = [result["searches"].get(candidate_name(family, b)) for b in MM_EXPERT_BOUNDS]
    if None in searches:
        return []
    return [
        "",
        f"{label}'s validation NLL per {step} "
        f"({', '.join(f'{v:g}' for v in searches[0]['grid'])}) and expert bound: "
        + "; ".join(
            f"{bound} " + ", ".join(f"{v:.4f}" for v in search["validation_nll"])
            for bound, search in zip(MM_EXPERT_BOUNDS, searches, strict=True)
        )
        + ".",
    ]


def _acceptance_lines(result: dict, variant: str) -> List[str]:
    check = result["acceptance_on_means"][variant]
    per_rep = [r[variant] for r in result["acceptance_per_repetition"]]
    return [
        "",
        f"{variant} vs EM at equal samples seen: {100 * check['relative_gap_to_em']:+.2f}%"
        f" (within 2%: {check['within_2_percent_of_em']}; per repetition "
        f"{sum(r['within_2_percent_of_em'] for r in per_rep)}/{len(per_rep)}); vs EM run to "
        f"convergence: {100 * check['relative_gap_to_converged_em']:+.2f}% (within 2%: "
        f"{check['within_2_percent_of_converged_em']}; per repetition "
        f"{sum(r['within_2_percent_of_converged_em'] for r in per_rep)}/{len(per_rep)}); "
        f"below every gradient method: {check['below_every_gradient_method']} (per "
        f"repetition {sum(r['below_every_gradient_method'] for r in per_rep)}/{len(per_rep)};"
        f" best gradient method {check['best_gradient_method']}).",
        *_paired_difference_lines(result, variant),
    ]


def _minimiser_lines(result: dict) -> List[str]:
    """Whether a minimiser of the penalised objective itself (EM run to convergence from the
    common start) is below every gradient method. Where it is not, a method that minimises the
    objective better does not meet the "below every gradient method" check either: the check
    then tells where the gradient methods stopped (their tuned step sizes and the budget act as
    early stopping), not how fast a method optimises."""
    repetitions, minimiser = result["repetitions"], "EM (converged)"
    log_loss = {method: _log_losses(repetitions, method) for method in (minimiser, *GRADIENT_GRIDS)}
    best = min(GRADIENT_GRIDS, key=lambda name: log_loss[name].mean())
    below = all(log_loss[minimiser].mean() < log_loss[name].mean() for name in GRADIENT_GRIDS)
    per_repetition = int(
        np.all([log_loss[minimiser] < log_loss[name] for name in GRADIENT_GRIDS], axis=0).sum()
    )
    line = (
        f"EM run to convergence (a minimiser of the penalised objective, from the common "
        f"start) vs the gradient methods: {log_loss[minimiser].mean():.4f} against {best} "
        f"{log_loss[best].mean():.4f} on the means; below every gradient method: {below} (per "
        f"repetition {per_repetition}/{len(repetitions)})"
    )
    if len(repetitions) >= 2:
        line += f"; minus {best}, paired by repetition: " + _paired_difference(
            log_loss[minimiser], log_loss[best]
        )
    return ["", line + "."]


def _log_losses(repetitions: List[dict], method: str) -> np.ndarray:
    """``method``'s test log-loss in each repetition."""
    return np.array([row["log_loss"] for row in method_rows(repetitions, method)])


def _paired_difference(own: np.ndarray, reference: np.ndarray) -> str:
    """``own - reference`` paired by repetition: ``"mean (standard error)"``."""
    difference = own - reference
    error = difference.std(ddof=1) / np.sqrt(len(difference))
    return f"{difference.mean():+.4f} ({error:.4f})"


def _paired_difference_lines(result: dict, variant: str) -> List[str]:
    """``variant``'s test log-loss minus each reference's, paired by repetition (same split and
    start): mean and standard error over the repetitions, the scale on which the comparisons
    above are decided (the test sets of the small data sets are 45-171 rows)."""
    repetitions = result["repetitions"]
    if len(repetitions) < 2:
        return []

    best_gradient = result["acceptance_on_means"][variant]["best_gradient_method"]
    own = _log_losses(repetitions, variant)
    cells = [
        f"{reference} {_paired_difference(own, _log_losses(repetitions, reference))}"
        for reference in (best_gradient, "EM", "EM (converged)")
    ]
    return [
        "",
        f"{variant}'s test log-loss minus, paired by repetition, mean (standard error over "
        f"{len(repetitions)} repetitions): " + "; ".join(cells) + ".",
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument(
        "--epochs", type=int, default=None, help="passes over the training rows (all data sets)"
    )
    parser.add_argument("--repetitions", type=int, default=3, help="seeds per data set")
    parser.add_argument("--experts", type=int, default=2, help="K for the real data sets")
    parser.add_argument(
        "--l2",
        type=float,
        default=None,
        help="L2 strength of every method's objective (default: chosen from L2_GRID on the "
        "validation split per data set)",
    )
    parser.add_argument("--synthetic-rows", type=int, default=20_000)
    parser.add_argument(
        "--stream-rows", type=int, default=100_000, help="rows of the one-pass synthetic stream"
    )
    parser.add_argument("--em-max-iter", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--out", default="classification", help="results file stem")
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="only rewrite the table of --out from its JSON (no fits)",
    )
    return parser.parse_args(argv)


def this_machine() -> str:
    """The machine a run fits on, as its table's last line states it."""
    return (
        f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )


def report(command: str, results: List[dict], args, machine: str = None) -> str:
    """The markdown of a run: its command, protocol, one table per data set, the machine.

    :param str machine: the run's machine (:func:`this_machine` at the run); ``None`` for a
        run whose JSON predates recording it: the line then names the re-rendering machine
        as such.
    """
    if machine is None:
        machine = (
            f"Machine: not recorded by the run; this table was re-rendered on {this_machine()}."
        )
    else:
        machine = f"Machine: {machine}."
    table = markdown(results, args)
    return (
        f"Command: `{command}`\n\n"
        "Softmax-gated multinomial-logistic MoE, every method from one K-means start per "
        "repetition with the same budget of passes (samples seen); step sizes (learning rates, "
        "schedule exponents) tuned on a 20% validation split of the first repetition's training "
        "rows and reused. Every method minimises the same penalised objective, the mean NLL plus "
        "lambda/2 (||W||^2 + sum_k ||V_k||^2) on all gate and expert weights (MM/EM/"
        "MirrorDescentEM through their ridges, the gradient methods through their loss), with "
        "one lambda per data set "
        + (
            "chosen from " + ", ".join(f"{v:g}" for v in L2_GRID) + " by the validation NLL of "
            "the objective's minimiser (EM to convergence) on the same split, before the step "
            "sizes are tuned"
            if args.l2 is None
            else f"fixed at {args.l2:g}"
        )
        + ". Incremental "
        f"MM: step gamma constant over the first {MM_DECAY_FRACTION:g} of its steps, then "
        f"decaying as gamma (n_0 / n)^{MM_DECAY_EXPONENT:g}, Polyak average over the last "
        f"{1 - POLYAK_FRACTION:g} of its steps, expert "
        "softmax bound chosen on the validation split with gamma (validation NLL per bound "
        "below each table). FiniteSumMM: incremental MM whose mini-batches' statistics are kept "
        "and replaced when a batch comes again (no step size), with its own expert bound and "
        "number of MM iterations per batch (each re-anchoring only that batch's term; its samples "
        "count once) chosen on the validation split.\n" + table + f"\n\n{machine}\n"
    )


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    stem, from_json = os.path.join(RESULTS_DIR, args.out), args.from_json
    if from_json:
        # A new table layout for results already run: the run's own command and arguments.
        with open(stem + ".json") as handle:
            saved = json.load(handle)
        command, results = saved["command"], saved["results"]
        args = argparse.Namespace(**saved["args"])
        machine = saved.get("machine")
    else:
        machine = this_machine()
        command = "python benchmarks/classification.py" + "".join(
            " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        results = []
        for name in args.datasets:
            print(f"{name}:", flush=True)
            results.append(run_dataset(name, args))
    text = report(command, results, args, machine)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(stem + ".md", "w") as handle:
        handle.write(text)
    if not from_json:
        with open(stem + ".json", "w") as handle:
            json.dump(
                {"command": command, "machine": machine, "args": vars(args), "results": results},
                handle,
                indent=2,
            )
    print(text)


if __name__ == "__main__":
    main()
