"""One comparison interface for every fitting method: the same model specification, the same
starting point, the same data stream, the same history record and the same evaluation.

A fitting method is any object with the verbs of :class:`~pyro_mm.infer.IncrementalMM` (duck
typing): ``fit(x, y, *, batch_size, epochs, progress)`` for streaming methods, or
``fit(x, y, *, max_iter, ...)`` for batch methods such as EM (one iteration per pass over the
data, so every method gets the same number of passes), each returning a
:class:`~pyro_mm.infer.FitHistory` and writing its estimate into the model it was built on.
"""

import dataclasses
import inspect
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..init import kmeans_init
from ..metrics import evaluate_fit, mean_nll
from ..models.base import MixtureOfExperts
from ..models.params import MoEParams, tree_map
from ..validation import as_tensor
from .history import FitHistory

__all__ = [
    "Method",
    "LearningRateSearch",
    "MethodResult",
    "run_fit",
    "fit_method",
    "tune_learning_rate",
    "validation_split",
    "validation_nll",
    "compare_methods",
]


@dataclasses.dataclass
class Method:
    """A named way of fitting a model.

    :ivar str name: label of the method in tables.
    :ivar build: ``build(model) -> fitter``, or ``build(model, learning_rate) -> fitter`` when
        ``learning_rates`` is given.
    :ivar tuple learning_rates: grid searched by :func:`tune_learning_rate` (empty: no tuning).
    :ivar priors: priors the method's model is built with (e.g. ``MoEPriors()`` for MAP with an
        ``AutoDelta`` guide); ``None`` for likelihood-based methods.
    """

    name: str
    build: Callable[..., Any]
    learning_rates: Sequence[float] = ()
    priors: Any = None

    def make_fitter(self, model, learning_rate: float = None):
        """The fitter of this method on ``model`` (at ``learning_rate`` when it is tuned)."""
        if self.learning_rates:
            if learning_rate is None:
                raise ValueError(f"method {self.name!r} needs a learning rate from its grid")
            return self.build(model, learning_rate)
        if learning_rate is not None:
            raise ValueError(f"method {self.name!r} has no learning rate to set")
        return self.build(model)


@dataclasses.dataclass
class LearningRateSearch:
    """The outcome of a learning-rate grid search on a validation split.

    :ivar list grid: the learning rates tried.
    :ivar list validation_nll: mean NLL of the validation rows after fitting with each
        (``inf`` where the fit diverged).
    :ivar float best: the learning rate with the lowest validation NLL.
    :ivar dict failures: ``{learning rate: error message}`` of the fits that diverged.
    """

    grid: List[float]
    validation_nll: List[float]
    best: float
    failures: Dict[float, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MethodResult:
    """What one method produced in a comparison.

    :ivar str name: the method's name.
    :ivar FitHistory history: per-step loss, samples seen and wall time.
    :ivar MoEParams params: the fitted parameters.
    :ivar dict metrics: :func:`pyro_mm.metrics.evaluate_fit` on the test split.
    :ivar float fit_seconds: wall time of the fit (not of the tuning).
    :ivar float learning_rate: the learning rate used (``None`` when not tuned).
    :ivar LearningRateSearch search: the grid search that chose it, when run here.
    :ivar list warnings: messages of the warnings the fit raised (e.g. EM not converged).
    """

    name: str
    history: FitHistory
    params: MoEParams
    metrics: Dict[str, float]
    fit_seconds: float
    learning_rate: Optional[float] = None
    search: Optional[LearningRateSearch] = None
    warnings: List[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain-data view (lists and floats) for JSON."""
        return {
            "name": self.name,
            "history": self.history.as_dict(),
            "params": dataclasses.asdict(tree_map(lambda t: t.tolist(), self.params)),
            "metrics": dict(self.metrics),
            "fit_seconds": self.fit_seconds,
            "learning_rate": self.learning_rate,
            "search": None if self.search is None else dataclasses.asdict(self.search),
            "warnings": list(self.warnings),
        }


def run_fit(fitter, x, y, *, batch_size: int, epochs: int, progress: bool = False) -> FitHistory:
    """Runs any fitting object on ``(x, y)`` with a budget of ``epochs`` passes over the data.

    Streaming methods (``fit`` takes ``batch_size``) take mini-batches of ``batch_size`` rows
    in order; batch methods (``fit`` takes ``max_iter``) take ``epochs`` full-data iterations.

    :returns: the :class:`FitHistory` the fit returned.
    """
    accepted = inspect.signature(fitter.fit).parameters
    if "batch_size" in accepted:
        history = fitter.fit(x, y, batch_size=batch_size, epochs=epochs, progress=progress)
    elif "max_iter" in accepted:
        options = {"max_iter": epochs}
        if "progress" in accepted:
            options["progress"] = progress
        history = fitter.fit(x, y, **options)
    else:
        raise TypeError(
            f"{type(fitter).__name__}.fit takes neither batch_size (streaming methods) nor "
            f"max_iter (batch methods); it cannot be run in a comparison"
        )
    if not isinstance(history, FitHistory):
        raise TypeError(
            f"{type(fitter).__name__}.fit returned {type(history).__name__}, not a FitHistory"
        )
    return history


def fit_method(
    method: Method,
    make_model: Callable,
    x,
    y,
    *,
    init_params: MoEParams,
    batch_size: int,
    epochs: int,
    learning_rate: float = None,
    progress: bool = False,
):
    """Builds ``method``'s model at ``init_params`` and fits it.

    :param Method method: the method.
    :param make_model: ``make_model(priors=...) -> model``, e.g.
        ``functools.partial(GaussianMoE, 2, 10)``.
    :param MoEParams init_params: the starting point (written into the fresh model).
    :returns: ``(model, history, fit_seconds, warning messages)``.
    """
    model = make_model(priors=method.priors).to(torch.float64)
    model.set_params(tree_map(torch.clone, init_params))
    fitter = method.make_fitter(model, learning_rate)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = run_fit(fitter, x, y, batch_size=batch_size, epochs=epochs, progress=progress)
    return model, history, time.perf_counter() - start, [str(w.message) for w in caught]


def validation_split(num_rows: int, validation_fraction: float = 0.2, seed: int = 0):
    """``(fit_rows, valid_rows)``: the row indices shuffled with ``seed``, the last
    ``validation_fraction`` of them held out (at least one row), as
    :func:`tune_learning_rate` splits its data.

    :raises ValueError: when fewer than two rows would be left to fit on.
    """
    num_valid = max(1, int(round(validation_fraction * num_rows)))
    if num_rows - num_valid < 2:
        raise ValueError(f"{num_rows} rows are too few to hold out a validation split")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[:-num_valid], order[-num_valid:]


def validation_nll(method: Method, make_model: Callable, x, y, split, **fit_options) -> float:
    """The mean NLL of the held-out rows after fitting ``method`` on the others.

    :param tuple split: ``(fit_rows, valid_rows)``, e.g. from :func:`validation_split`.
    :param fit_options: keyword arguments of :func:`fit_method` (``init_params``,
        ``batch_size``, ``epochs``, ``learning_rate``, ...).
    """
    fit_rows, valid_rows = split
    model, _, _, _ = fit_method(method, make_model, x[fit_rows], y[fit_rows], **fit_options)
    return mean_nll(model, x[valid_rows], y[valid_rows])


def tune_learning_rate(
    method: Method,
    make_model: Callable,
    x,
    y,
    *,
    init_params: MoEParams,
    batch_size: int,
    epochs: int,
    validation_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> LearningRateSearch:
    """Picks ``method``'s learning rate from its grid by the NLL of a validation split.

    The rows of ``(x, y)`` are shuffled with ``seed``; the last ``validation_fraction`` of them
    are held out, the method is fitted on the others from ``init_params`` with the same budget
    as the final fit, once per learning rate, and the learning rate with the lowest mean NLL of
    the held-out rows wins. A fit that diverges (a non-finite loss or parameters) scores
    ``inf``.

    :returns: a :class:`LearningRateSearch` (the grid, the scores and the choice).
    """
    if not method.learning_rates:
        raise ValueError(f"method {method.name!r} has no learning-rate grid")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    x = as_tensor("x", x)
    y = as_tensor("y", y, allow_integer=True)
    fit_rows, valid_rows = validation_split(len(x), validation_fraction, seed)
    scores, failures = [], {}
    for learning_rate in method.learning_rates:
        try:
            score = validation_nll(
                method,
                make_model,
                x,
                y,
                (fit_rows, valid_rows),
                init_params=init_params,
                batch_size=batch_size,
                epochs=epochs,
                learning_rate=learning_rate,
                progress=progress,
            )
        except (FloatingPointError, ValueError) as err:
            # Only divergence is expected here; both errors are raised before a bad update.
            failures[float(learning_rate)] = str(err)
            score = math.inf
        scores.append(score if math.isfinite(score) else math.inf)
    if all(math.isinf(s) for s in scores):
        raise FloatingPointError(
            f"every learning rate of {method.name!r} diverged: {failures}; try a smaller grid"
        )
    best = float(method.learning_rates[min(range(len(scores)), key=scores.__getitem__)])
    return LearningRateSearch(
        grid=[float(v) for v in method.learning_rates],
        validation_nll=scores,
        best=best,
        failures=failures,
    )


def compare_methods(
    methods: Sequence[Method],
    make_model: Callable,
    x_train,
    y_train,
    x_test,
    y_test,
    *,
    truth: MoEParams = None,
    init_params: MoEParams = None,
    init_gate: str = "zero",
    batch_size: int = 32,
    epochs: int = 10,
    learning_rates: Dict[str, float] = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, MethodResult]:
    """Fits every method on the same training stream from the same start and evaluates it.

    :param methods: the :class:`Method` s to run (names must be unique).
    :param make_model: ``make_model(priors=...) -> model``: every method fits a fresh model of
        this specification.
    :param x_train: training inputs (fed in order, ``batch_size`` rows per step, ``epochs``
        passes).
    :param y_train: training outputs.
    :param x_test: held-out inputs for the evaluation.
    :param y_test: held-out outputs.
    :param MoEParams truth: true parameters of synthetic data (adds estimation errors and the
        parameter error to the metrics).
    :param MoEParams init_params: common starting point; default: K-means
        (:func:`pyro_mm.init.kmeans_init`, 10 restarts, ``seed``) on the training rows.
    :param str init_gate: gate of the default start: ``"zero"`` or ``"logistic"`` (a logistic
        regression of the K-means labels, the paper's "Incremental MM*" start).
    :param int batch_size: rows per step of the streaming methods.
    :param int epochs: passes over the training rows (iterations of batch methods).
    :param dict learning_rates: ``{method name: learning rate}`` fixed in advance; methods with
        a grid that are not listed are tuned here by :func:`tune_learning_rate`.
    :param float validation_fraction: share of the training rows held out by the tuning.
    :param int seed: seed of the K-means start and of the tuning split.
    :param bool progress: show progress bars (one over the methods, one per fit).
    :returns: ``{method name: MethodResult}`` in the order of ``methods``.
    """
    from tqdm.auto import tqdm

    methods = list(methods)
    if not methods:
        raise ValueError("methods is empty: give at least one Method to compare")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    learning_rates = dict(learning_rates or {})
    unknown = sorted(set(learning_rates) - set(names))
    if unknown:
        raise ValueError(f"learning_rates names unknown methods {unknown}; methods are {names}")
    # Every input is checked before the first fit, not after minutes of them.
    reference = make_model(priors=None)
    if not isinstance(reference, MixtureOfExperts):
        raise TypeError(
            f"make_model(priors=None) must return a pyro_mm mixture of experts, got "
            f"{type(reference).__name__}"
        )
    reference = reference.to(torch.float64)
    x_ref = reference.check_x(x_train)
    y_ref = reference.check_y(y_train, x_ref.shape[0])
    x_check = reference.check_x(x_test)
    reference.check_y(y_test, x_check.shape[0])
    if init_params is None:
        init_params = kmeans_init(reference, x_ref, y_ref, gate=init_gate, seed=seed)
    results = {}
    for method in tqdm(methods, disable=not progress, desc="methods"):
        search, learning_rate = None, learning_rates.get(method.name)
        if method.learning_rates and learning_rate is None:
            search = tune_learning_rate(
                method,
                make_model,
                x_train,
                y_train,
                init_params=init_params,
                batch_size=batch_size,
                epochs=epochs,
                validation_fraction=validation_fraction,
                seed=seed,
            )
            learning_rate = search.best
        model, history, seconds, caught = fit_method(
            method,
            make_model,
            x_train,
            y_train,
            init_params=init_params,
            batch_size=batch_size,
            epochs=epochs,
            learning_rate=learning_rate,
            progress=progress,
        )
        results[method.name] = MethodResult(
            name=method.name,
            history=history,
            params=model.get_params(),
            metrics=evaluate_fit(model, x_test, y_test, truth),
            fit_seconds=seconds,
            learning_rate=learning_rate,
            search=search,
            warnings=caught,
        )
    return results
