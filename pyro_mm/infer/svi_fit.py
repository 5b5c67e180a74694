"""Gradient-based fitting through Pyro's ELBO: maximum likelihood, MAP and variational Bayes,
with any Pyro optimiser or any torch optimiser (SophiaH included), under the verbs of
:class:`~pyro_mm.infer.IncrementalMM`."""

import contextlib
import copy
import inspect
import math

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoGuide,
    AutoLaplaceApproximation,
    AutoNormal,
    init_to_value,
)
from torch.distributions import biject_to

from ..init import check_init, initial_params
from ..models.base import MixtureOfExperts
from .batches import check_batch
from .fit_loop import fit_batches
from .history import FitHistory
from .state import check_finite_state, check_matching_options, qualified_name

__all__ = ["SVIFit", "needs_closure", "needs_hessian_graph"]


def needs_hessian_graph(optimizer_class: type) -> bool:
    """Whether a torch optimiser estimates Hessian-vector products from the backward graph.

    Such optimisers (``SophiaH``, ``AdaHessian`` from pytorch-optimizer) take a ``hessian``
    argument in ``step`` and need ``loss.backward(create_graph=True)``.
    """
    return "hessian" in inspect.signature(optimizer_class.step).parameters


def needs_closure(optimizer_class: type) -> bool:
    """Whether a torch optimiser's ``step`` requires a closure that re-evaluates the loss
    (``torch.optim.LBFGS``: several evaluations per step, for its line search)."""
    closure = inspect.signature(optimizer_class.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _no_latent_guide(*args, **kwargs):
    """The guide of a model without latent variables: SVI then maximises the likelihood."""
    return None


class SVIFit:
    r"""Fits a mixture of experts by stochastic gradient steps on Pyro's ELBO.

    * ``guide=None`` on a model without priors: the ELBO is the log-likelihood, so this is
      maximum likelihood by SGD, Adam, RMSProp, SophiaH, ... (the paper's baselines);
    * an autoguide class on a model with priors (``GaussianMoE(..., priors=MoEPriors())``):
      ``AutoDelta`` gives the MAP estimate, ``AutoNormal`` / ``AutoMultivariateNormal`` a
      variational posterior. The guide starts at the model's current parameters.

    The objective is the ELBO divided by the data-set size ``num_data`` (a mini-batch's
    likelihood is scaled by ``num_data / batch size`` as usual), so for maximum likelihood it is
    the batch's mean negative log-likelihood and learning rates keep their usual meaning. Used
    like :class:`~pyro_mm.infer.IncrementalMM`::

        model = GaussianMoE(2, 10)
        fit = SVIFit(model, optim=torch.optim.Adam, optim_args={"lr": 0.01})
        history = fit.fit(x, y, batch_size=32, epochs=10)

    After every step the model holds the point estimate (for a guide: its ``median()``), so
    ``model.predict``, ``model.log_prob`` and :mod:`pyro_mm.metrics` apply unchanged.
    Every call runs in this fit's own scope of Pyro's param store, so several fits of models
    with the same parameter names in one process never read each other's parameters.

    **Checkpoints.** :meth:`state_dict` / :meth:`load_state_dict` save and restore the model's
    and the guide's parameters, the optimiser's state, the random state of the ELBO's draws, the
    counters and the history; resuming an interrupted stream from a checkpoint (through
    ``torch.save``/``torch.load``) gives bit-identical parameters to the uninterrupted run.

    :param MixtureOfExperts model: the model to fit; it is moved to ``dtype``.
    :param guide: ``None`` (maximum likelihood), an autoguide class (built on the model with
        ``init_loc_fn`` at the model's current parameters and ``guide_args``), or a guide.
    :param optim: a Pyro optimiser instance (e.g. ``pyro.optim.ClippedAdam({"lr": 0.01})``),
        stepped through :class:`pyro.infer.SVI`, or a torch optimiser class (e.g.
        ``torch.optim.AdamW``, ``pytorch_optimizer.SophiaH``) built with ``optim_args`` over
        the model's and the guide's parameters. Default: ``torch.optim.Adam``. An optimiser
        whose ``step`` needs a closure (``torch.optim.LBFGS``) gets one that re-evaluates the
        batch's objective; it must be passed as a class (Pyro's SVI passes no closure).
    :param dict optim_args: keyword arguments of a torch optimiser class (default
        ``{"lr": 0.01}``).
    :param loss: the ELBO (default :class:`~pyro.infer.Trace_ELBO`; ``JitTrace_ELBO`` and,
        for torch optimiser classes without ``create_graph``, ``TraceGraph_ELBO`` also work;
        ``vectorize_particles=True`` only for models without priors, whose per-draw code
        cannot take a batch of parameter draws). ``AutoLaplaceApproximation`` writes its
        point (the posterior mode in unconstrained coordinates) into the model, and its
        ``laplace_approximation(x, y)`` gives the Laplace posterior.
    :param dict guide_args: extra keyword arguments of an autoguide class (e.g.
        ``{"init_scale": 0.01}`` for ``AutoNormal``).
    :param int num_data: size of the data set the batches come from (weighs the priors against
        the likelihood); default: the number of rows given to :meth:`fit`, or the batch size
        for :meth:`step` and streams.
    :param bool create_graph: keep the backward graph for Hessian-vector products (default:
        :func:`needs_hessian_graph` of the optimiser class).
    :param str init: ``"auto"`` (K-means on the first batch unless the model is already
        fitted), ``"kmeans"``, ``"kmeans-logistic"``, ``"spectral"`` or ``"current"``, as in
        IncrementalMM.
    :param int seed: seed of the K-means initialisation and of the draws of the ELBO and of the
        optimiser (kept in a private random state: the global one is left alone).
    :param torch.dtype dtype: dtype of the parameters.
    """

    def __init__(
        self,
        model: MixtureOfExperts,
        guide=None,
        optim=None,
        *,
        optim_args: dict = None,
        loss=None,
        guide_args: dict = None,
        num_data: int = None,
        create_graph: bool = None,
        init: str = "auto",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        if not isinstance(model, MixtureOfExperts):
            raise TypeError(
                f"model must be a pyro_mm mixture of experts, got {type(model).__name__}"
            )
        if guide is None and model.has_priors:
            raise ValueError(
                f"the model has priors on {sorted(model.prior_distributions())}, so its "
                f"parameters are latent variables and need a guide: guide=AutoDelta (MAP) or "
                f"AutoNormal (variational Bayes)"
            )
        if guide is not None and not model.has_priors:
            raise ValueError(
                "the model has no priors, so it has no latent variables for a guide to fit; "
                "use guide=None (maximum likelihood) or build the model with priors="
            )
        if isinstance(guide, type) and not issubclass(guide, AutoGuide):
            raise TypeError(f"a guide class must be an autoguide, got {guide.__name__}")
        if guide_args and not isinstance(guide, type):
            raise ValueError("guide_args apply only when guide is an autoguide class")
        _check_guide_can_cover_supports(guide, model)
        check_init(init)
        if num_data is not None and (
            isinstance(num_data, bool) or int(num_data) != num_data or num_data < 1
        ):
            raise ValueError(f"num_data must be a positive integer or None, got {num_data!r}")
        optim = torch.optim.Adam if optim is None else optim
        if isinstance(optim, pyro.optim.PyroOptim):
            if optim_args:
                raise ValueError(
                    "optim_args apply to a torch optimiser class; a Pyro optimiser carries its "
                    "own arguments, e.g. pyro.optim.Adam({'lr': 0.01})"
                )
            if needs_closure(optim.pt_optim_constructor):
                raise ValueError(
                    f"pyro.infer.SVI steps an optimiser without a closure, and "
                    f"{optim.pt_optim_constructor.__name__} needs one: pass it as a torch "
                    f"optimiser class, SVIFit(model, optim="
                    f"torch.optim.{optim.pt_optim_constructor.__name__}, optim_args={{...}})"
                )
            if needs_hessian_graph(optim.pt_optim_constructor) or create_graph:
                raise ValueError(
                    "pyro.infer.SVI differentiates without create_graph, so optimisers that "
                    "need Hessian-vector products (SophiaH) must be passed as a torch optimiser "
                    "class: SVIFit(model, optim=SophiaH, optim_args={...})"
                )
            create_graph = False
        elif isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer):
            optim_args = {"lr": 0.01} if optim_args is None else dict(optim_args)
            create_graph = needs_hessian_graph(optim) if create_graph is None else create_graph
            if create_graph and needs_closure(optim):
                raise ValueError(
                    f"{optim.__name__} re-evaluates the loss through a closure; create_graph "
                    "(Hessian-vector products) is not available with it"
                )
        else:
            raise TypeError(
                f"optim must be a Pyro optimiser instance (pyro.optim.Adam({{'lr': 0.01}})) or a "
                f"torch optimiser class (torch.optim.Adam), got {optim!r}"
            )
        loss = Trace_ELBO() if loss is None else loss
        _check_loss(loss, model, create_graph)
        # Read once: inspecting the optimiser's signature at every step would cost more than
        # its bookkeeping.
        self._steps_with_closure = isinstance(optim, type) and needs_closure(optim)
        self.model = model.to(dtype)
        self.guide_spec = guide
        self.guide_args = dict(guide_args or {})
        self.optim = optim
        self.optim_args = optim_args
        self.loss = loss
        self.num_data = None if num_data is None else int(num_data)
        self.create_graph = bool(create_graph)
        self.init = init
        self.seed = seed
        self.dtype = dtype
        #: the guide (``None`` until the first step builds it).
        self.guide = None
        #: the torch optimiser (torch optimiser classes) or :class:`pyro.infer.SVI` (Pyro ones).
        self.optimizer = None
        #: the scaled objective (ELBO / num_data) of the last step, before its update.
        self.last_objective = None
        #: number of steps taken.
        self.num_steps = 0
        #: samples consumed by ``step``.
        self.samples_seen = 0
        self.history = FitHistory()
        self._rng_state = torch.Generator().manual_seed(seed).get_state()
        self._fit_num_data = None
        self._trained = []
        self._param_state = None
        # Pyro parameters and optimiser state of a loaded checkpoint, applied by the next
        # ``initialize`` (an autoguide's parameters exist only once it has seen a batch).
        self._pending_state = None

    # ------------------------------------------------------------------------------ checks
    def _check_batch(self, x, y):
        return check_batch(self.model, self.dtype, x, y)

    # -------------------------------------------------------------------------------- verbs
    def initialize(self, x, y) -> None:
        """Sets the starting point (per ``init``) from a first batch, then builds the guide at
        it and the optimiser. Called by the first :meth:`step` when not called before.

        After :meth:`load_state_dict` of a fitted state the model already holds the state's
        parameters: the guide and the optimiser are built and given the state's values instead.
        """
        x, y = self._check_batch(x, y)
        pending, rng_state = self._pending_state, self._rng_state
        if pending is None:
            self.model.set_params(initial_params(self.model, x, y, self.init, seed=self.seed))
        try:
            with self._context():
                self.guide = self._build_guide()
                if isinstance(self.guide, torch.nn.Module):
                    self.guide(x, y, num_data=self._num_data(x))  # creates an autoguide's params
                if pending is not None:
                    self._load_param_store(pending["param_store"], x, y)
                self._trained = self._trainable_parameters()
                if isinstance(self.optim, pyro.optim.PyroOptim):
                    self.optimizer = SVI(*self._scaled(x), self.optim, self.loss)
                    if pending is not None:
                        self.optim.set_state(pending["optimizer"])
                else:
                    self.optimizer = self.optim(self._trained, **self.optim_args)
                    if pending is not None:
                        self.optimizer.load_state_dict(pending["optimizer"])
        except BaseException:
            if pending is not None:
                self.guide, self.optimizer, self._trained = None, None, []
            raise
        if pending is None:
            self.num_steps = 0
        else:
            # Building the guide drew random numbers the interrupted run had drawn already.
            self._pending_state, self._rng_state = None, rng_state

    def step(self, x, y) -> float:
        """One gradient step on the scaled ELBO of a mini-batch.

        :param x: inputs ``(N, P)``.
        :param y: outputs of the model's family.
        :returns: the batch's mean negative log-likelihood at the point estimate the step was
            given (the same quantity every fitting method reports).
        :rtype: float
        """
        x, y = self._check_batch(x, y)
        if self.guide is None:
            self.initialize(x, y)
        loss = self.evaluate_loss(x, y)
        if not math.isfinite(loss):
            raise ValueError(
                "the batch's log-likelihood is not finite at the current parameters; "
                "the state was left unchanged"
            )
        before = [p.detach().clone() for p in self._trained]
        with self._context():
            objective = self._gradient_step(x, y)
            if not all(bool(torch.isfinite(p).all()) for p in self._trained):
                with torch.no_grad():
                    for p, old in zip(self._trained, before, strict=True):
                        p.copy_(old)
                raise FloatingPointError(
                    "the gradient step produced non-finite parameters; they were restored to "
                    "their values before the step (lower the learning rate)"
                )
            self._write_point_estimate(x, y)
        self.last_objective = objective
        self.num_steps += 1
        self.samples_seen += x.shape[0]
        return loss

    def evaluate_loss(self, x, y) -> float:
        """Mean negative log-likelihood of ``(x, y)`` at the current point estimate."""
        with torch.no_grad():
            return -self.model.log_prob(x, y).mean().item()

    def fit(
        self,
        x,
        y=None,
        *,
        batch_size: int = None,
        epochs: int = 1,
        shuffle: bool = False,
        progress: bool = True,
    ):
        """Runs :meth:`step` over a whole stream.

        :param x: inputs ``(N, P)``, or (with ``y=None``) an iterable of ``(x, y)`` batches.
        :param y: outputs, or ``None`` when ``x`` is a stream of batches.
        :param int batch_size: rows per step for array inputs (default 256, as IncrementalMM).
        :param int epochs: passes over the data.
        :param bool shuffle: take the rows of arrays in a new random order at each epoch
            (seeded by ``seed``); without it, in their order, which must then be random.
        :param bool progress: show a tqdm progress bar.
        :returns: the :class:`FitHistory` of this call (also appended to ``self.history``).
        """
        if y is not None and batch_size is None:
            batch_size = 256
        self._fit_num_data = len(x) if y is not None else None
        try:
            return fit_batches(self, x, y, batch_size, epochs, shuffle=shuffle, progress=progress)
        finally:
            self._fit_num_data = None

    # ---------------------------------------------------------------------------- checkpoints
    def _options(self) -> dict:
        """What defines the iteration besides its state; a state loads only into a match."""
        optim = self.optim
        if isinstance(optim, pyro.optim.PyroOptim):
            optim = f"{qualified_name(optim)}({qualified_name(optim.pt_optim_constructor)})"
        else:
            optim = qualified_name(optim)
        return {
            "model": type(self.model).__name__,
            "num_experts": self.model.num_experts,
            "priors": sorted(self.model.prior_distributions()),
            "guide": None if self.guide_spec is None else qualified_name(self.guide_spec),
            "guide_args": {
                key: value if _is_plain(value) else qualified_name(value)
                for key, value in sorted(self.guide_args.items())
            },
            "optim": optim,
            "loss": f"{qualified_name(self.loss)}(num_particles="
            f"{getattr(self.loss, 'num_particles', None)}, vectorize_particles="
            f"{getattr(self.loss, 'vectorize_particles', None)})",
            "num_data": self.num_data,
            "create_graph": self.create_graph,
            "dtype": str(self.dtype),
        }

    def state_dict(self) -> dict:
        """Everything the iteration depends on, as plain data (``torch.save`` it).

        Holds the options it was built with, ``init`` and ``seed``, the model's parameters
        (unconstrained, as the optimiser sees them) and point estimate, the Pyro parameters of
        this fit's param store (the guide's included), the optimiser's state (``state_dict()``
        of a torch optimiser, ``get_state()`` of a Pyro one: moments, step counts and
        hyperparameters such as the learning rate), the state of the private random generator
        that the ELBO's draws and the optimiser consume, the step and sample counters, the last
        objective and the history. The global random state is not used by a fit, so it is not
        stored.
        """
        pending = self._pending_state
        if pending is not None:
            param_store, optimizer = pending["param_store"], pending["optimizer"]
        elif self.guide is not None:
            param_store = dict(self._param_state["params"])
            optimizer = self._optimizer_state()
        else:
            param_store = optimizer = None
        return copy.deepcopy(
            {
                "options": self._options(),
                "init": self.init,
                "seed": self.seed,
                "model": {name: p.detach() for name, p in self.model.named_parameters()},
                "fitted": self.model.fitted,
                "initialized": param_store is not None,
                "param_store": None
                if param_store is None
                else {name: p.detach() for name, p in param_store.items()},
                "optimizer": optimizer,
                "rng_state": self._rng_state,
                "num_steps": self.num_steps,
                "samples_seen": self.samples_seen,
                "last_objective": self.last_objective,
                "history": self.history.as_dict(),
            }
        )

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`: the model's parameters at once, the guide's
        parameters and the optimiser's state when the next :meth:`step` builds them (an
        autoguide needs a batch to create its parameters). The optimiser's hyperparameters
        come from the state; Pyro's gradient clipping (``clip_args``) does not: pass the same.

        :raises ValueError: when the state was made with other options (model class, number of
            experts, priors, guide, optimiser class, loss, ``num_data``, ``create_graph``,
            dtype) or model parameter shapes; nothing is changed then. Pyro parameters that
            this fit's model and guide do not create are reported by the next :meth:`step`,
            which then leaves the fit as it was before the step.
        """
        check_matching_options("SVIFit", state["options"], self._options())
        check_finite_state(state)
        current = dict(self.model.named_parameters())
        stored = state["model"]
        if set(stored) != set(current):
            raise ValueError(
                f"the state holds the model parameters {sorted(stored)}, this model has "
                f"{sorted(current)}"
            )
        for name, value in stored.items():
            expected = current[name]
            if value.shape != expected.shape or value.dtype != expected.dtype:
                raise ValueError(
                    f"model parameter {name} has shape {tuple(value.shape)} and dtype "
                    f"{value.dtype} in the state, expected {tuple(expected.shape)} and "
                    f"{expected.dtype}"
                )
        check_init(state["init"])
        if state["initialized"] and state["param_store"] is None:
            raise ValueError("an initialised state must hold the param store's values")
        history = FitHistory(**copy.deepcopy(state["history"]))
        with torch.no_grad():
            for name, value in stored.items():
                current[name].copy_(value)
        self.model.fitted = bool(state["fitted"])
        self.init, self.seed = state["init"], state["seed"]
        self.guide, self.optimizer, self._trained, self._param_state = None, None, [], None
        if isinstance(self.optim, pyro.optim.PyroOptim):
            # Its per-parameter optimisers are rebuilt from the state at the next step.
            self.optim.optim_objs.clear()
            self.optim.grad_clip.clear()
        self._pending_state = (
            copy.deepcopy({"param_store": state["param_store"], "optimizer": state["optimizer"]})
            if state["initialized"]
            else None
        )
        self._rng_state = state["rng_state"].clone()
        self.num_steps, self.samples_seen = int(state["num_steps"]), int(state["samples_seen"])
        self.last_objective = state["last_objective"]
        self.history = history

    def _optimizer_state(self):
        if isinstance(self.optimizer, SVI):
            with self._context():  # Pyro names its optimisers' states by param store names
                return self.optim.get_state()
        return self.optimizer.state_dict()

    def _load_param_store(self, values: dict, x, y) -> None:
        """Writes a state's Pyro parameters into this fit's store (inside its context), after
        running the model and the guide once so that every parameter they create exists."""
        num_data = self._num_data(x)
        guide_trace = poutine.trace(self.guide).get_trace(x, y, num_data=num_data)
        poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(
            x, y, num_data=num_data
        )
        current = dict(pyro.get_param_store().named_parameters())
        unknown = sorted(set(values) - set(current))
        if unknown:
            raise ValueError(
                f"the state holds Pyro parameters {unknown} that this fit's model and guide do "
                f"not create (they create {sorted(current)})"
            )
        for name, value in values.items():
            if value.shape != current[name].shape or value.dtype != current[name].dtype:
                raise ValueError(
                    f"Pyro parameter {name} has shape {tuple(value.shape)} and dtype "
                    f"{value.dtype} in the state, expected {tuple(current[name].shape)} and "
                    f"{current[name].dtype}"
                )
        with torch.no_grad():
            for name, value in values.items():
                current[name].copy_(value)

    # --------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _context(self):
        """This fit's own Pyro param store scope and random state."""
        store = pyro.get_param_store()
        with store.scope(state=self._param_state) as state, torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            yield
            self._rng_state = torch.get_rng_state()
        self._param_state = state

    def _num_data(self, x) -> int:
        for size in (self.num_data, self._fit_num_data):
            if size is not None:
                return size
        return x.shape[0]

    def _scaled(self, x):
        scale = 1.0 / self._num_data(x)
        return poutine.scale(self.model, scale=scale), poutine.scale(self.guide, scale=scale)

    def _build_guide(self):
        if self.guide_spec is None:
            return _no_latent_guide
        if not isinstance(self.guide_spec, type):
            return self.guide_spec
        start = {self.model.site_name(n): v for n, v in self.model.param_values().items()}
        return self.guide_spec(
            self.model, init_loc_fn=init_to_value(values=start), **self.guide_args
        )

    def _trainable_parameters(self) -> list:
        lifted = {name + "_unconstrained" for name in self.model.prior_distributions()}
        params = [p for n, p in self.model.named_parameters() if n not in lifted]
        if isinstance(self.guide, torch.nn.Module):
            params += list(self.guide.parameters())
        return params

    def _gradient_step(self, x, y) -> float:
        num_data = self._num_data(x)
        if isinstance(self.optimizer, SVI):
            # SVI binds the (scaled) model at construction; the scale follows num_data.
            self.optimizer.model, self.optimizer.guide = self._scaled(x)
            return self.optimizer.step(x, y, num_data=num_data)
        if self._steps_with_closure:

            def closure():
                self.optimizer.zero_grad(set_to_none=True)
                return self._objective_and_gradients(x, y, num_data)

            # The objective of the closure's first call, at the parameters the step was given.
            return float(self.optimizer.step(closure))
        self.optimizer.zero_grad(set_to_none=True)
        if not self.create_graph:
            objective = self._objective_and_gradients(x, y, num_data)
            self.optimizer.step()
            return objective
        # Gradients that keep their graph (for the optimiser's Hessian-vector products);
        # autograd.grad rather than backward(create_graph=True) avoids a parameter <-> grad
        # reference cycle, and the gradients are dropped right after the step.
        objective = self.loss.differentiable_loss(*self._scaled(x), x, y, num_data=num_data)
        grads = torch.autograd.grad(objective, self._trained, create_graph=True, allow_unused=True)
        for p, grad in zip(self._trained, grads, strict=True):
            p.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return objective.item()

    def _objective_and_gradients(self, x, y, num_data: int) -> float:
        """The scaled objective, its gradients accumulated into the parameters' ``.grad``."""
        if hasattr(self.loss, "differentiable_loss"):
            objective = self.loss.differentiable_loss(*self._scaled(x), x, y, num_data=num_data)
            objective.backward()
            return objective.item()
        # ELBOs with a surrogate for non-reparameterised sites (TraceGraph_ELBO) have no
        # differentiable_loss; their loss_and_grads runs the backward pass itself.
        return self.loss.loss_and_grads(*self._scaled(x), x, y, num_data=num_data)

    def _write_point_estimate(self, x, y) -> None:
        if isinstance(self.guide, AutoLaplaceApproximation):
            # Its fitted posterior is a point mass (a Delta, without a median) at the posterior
            # mode in unconstrained coordinates: the guide's draw is that point, in the sites'
            # own coordinates, and draws no random number. ``guide.laplace_approximation(x,
            # y)`` then gives the Laplace posterior centred there.
            with torch.no_grad(), poutine.block():
                values = self.guide(x, y, num_data=self._num_data(x))
            self.model.set_param_values(values, validate=False)
        elif isinstance(self.guide, torch.nn.Module):
            # The median is in the support by construction (Pyro's transforms) and finite (the
            # step restores non-finite trained parameters before this).
            self.model.set_param_values(
                self.guide.median(x, y, num_data=self._num_data(x)), validate=False
            )
        else:
            self.model.fitted = True


def _check_loss(loss, model, create_graph) -> None:
    """Raises for an ELBO that cannot fit ``model`` (before any state exists)."""
    if getattr(loss, "vectorize_particles", False) and model.has_priors:
        raise ValueError(
            f"{type(loss).__name__}(vectorize_particles=True) draws every particle's latent "
            f"parameters at once, with a leading batch dimension, and pyro_mm models evaluate "
            f"one parameter draw at a time: use vectorize_particles=False"
        )
    if create_graph and not hasattr(loss, "differentiable_loss"):
        raise ValueError(
            f"create_graph (Hessian-vector products, SophiaH) needs an ELBO with a "
            f"differentiable_loss; {type(loss).__name__} has none (use Trace_ELBO)"
        )


def _check_guide_can_cover_supports(guide, model) -> None:
    """Raises for a Gaussian autoguide class and a prior whose support torch cannot map to
    unconstrained coordinates (``biject_to``, e.g. a Wishart prior on a covariance matrix), which
    would otherwise fail inside Pyro at the first step."""
    if not (isinstance(guide, type) and issubclass(guide, (AutoNormal, AutoContinuous))):
        return
    for name, prior in model.prior_distributions().items():
        try:
            biject_to(prior.support)
        except NotImplementedError:
            raise ValueError(
                f"{guide.__name__} draws every latent variable in unconstrained coordinates, "
                f"and torch has no bijection to the support {prior.support} of the prior on "
                f"{name!r}; use guide=AutoDelta (MAP), or a prior with another support"
            ) from None
