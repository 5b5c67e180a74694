"""Laplace approximation of the posterior around a point estimate (MM, EM, MAP).

In the unconstrained coordinates of the parameter sites (gate and expert weights as they are,
log-variances for variances: the bijections Pyro's autoguides use; a covariance matrix by the
``Q (Q + 1) / 2`` entries of its Cholesky factor, the diagonal's logarithms), the negative
log-posterior density of the full data set is expanded to second order at the point estimate
``u``:

.. math:: p(u' \\mid \\mathcal{D}) \\approx \\mathcal{N}\\big(u';\\ u,\\ H^{-1}\\big),
    \\qquad H = \\nabla^2_u \\Big(-\\sum_n \\log p(y_n \\mid x_n; u)
    - \\log p(\\theta(u)) - \\log \\big|\\det \\partial\\theta / \\partial u\\big|\\Big).

The last two terms are there for the parameters the model declares priors on
(``MoEPriors``; ``pyro.sample`` sites): their prior density carried to the unconstrained
coordinates, as :class:`pyro.infer.autoguide.AutoLaplaceApproximation` expands it. A parameter
without a prior (``pyro.param`` site) has a flat prior in the unconstrained coordinates, so a
model without priors gets the likelihood's Hessian alone. ``H`` is computed exactly by autograd
through the Pyro model, so every expert family with a Pyro model gets it without extra code.
"""

import math
import warnings

import torch
from pyro import poutine
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import Transform

from ..models.base import MixtureOfExperts
from .sites import ParameterSites, fix_sites, module_parameters_only, parameter_sites

__all__ = ["LaplacePosterior", "laplace_posterior"]


class LaplacePosterior:
    r"""A Gaussian ``N(loc, covariance)`` over the unconstrained parameter vector of a model.

    Built by :func:`laplace_posterior`; :meth:`sample` draws parameter values for every site,
    which :func:`~pyro_mm.diagnostics.to_inference_data` turns into an ArviZ posterior.

    :ivar ParameterSites sites: the model's parameter sites (names, shapes, constraints).
    :ivar torch.Tensor loc: ``(d,)`` the point estimate in unconstrained coordinates.
    :ivar torch.Tensor hessian: ``(d, d)`` Hessian at ``loc`` of the expanded density's
        negative logarithm: the full-data NLL, minus the log prior and log-Jacobian of the
        parameters with priors when ``includes_priors``.
    :ivar torch.Tensor gradient: ``(d,)`` its gradient at ``loc``.
    :ivar torch.Tensor eigenvalues: ``(d,)`` eigenvalues of ``hessian`` after regularisation.
    :ivar torch.Tensor eigenvectors: ``(d, d)`` the matching orthonormal eigenvectors.
    :ivar int num_clamped: eigenvalues that were below ``min_eigenvalue`` and were raised to it.
    :ivar float nll: full-data negative log-likelihood at ``loc``.
    :ivar bool includes_priors: whether the model's priors are part of the expansion.
    """

    def __init__(
        self,
        sites: ParameterSites,
        loc: torch.Tensor,
        hessian: torch.Tensor,
        gradient: torch.Tensor,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        num_clamped: int,
        nll: float,
        includes_priors: bool = False,
    ):
        self.sites = sites
        self.loc = loc
        self.hessian = hessian
        self.gradient = gradient
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.num_clamped = num_clamped
        self.nll = nll
        self.includes_priors = includes_priors

    @property
    def covariance(self) -> torch.Tensor:
        """``(d, d)`` covariance ``H^{-1}`` (of the regularised Hessian)."""
        return (self.eigenvectors / self.eigenvalues) @ self.eigenvectors.T

    @property
    def mode_offset(self) -> float:
        r"""``sqrt(g^T H^{-1} g)``: how far the mode of the quadratic expansion lies from ``loc``,
        in posterior standard deviations (``0`` at an exact stationary point)."""
        scaled = self.eigenvectors.T @ self.gradient / self.eigenvalues.sqrt()
        return scaled.norm().item()

    def constrained(self, unconstrained: torch.Tensor) -> dict:
        """Site values ``name -> (..., *shape)`` from unconstrained vectors ``(..., d)``."""
        return _constrained(self.sites, unconstrained)

    @property
    def mode(self) -> dict:
        """The point estimate as site values ``name -> tensor``."""
        return self.constrained(self.loc)

    def sample(self, num_samples: int, seed: int = 0) -> dict:
        """Draws parameter values ``name -> (num_samples, *shape)`` from the approximation.

        :param int num_samples: number of draws.
        :param int seed: seed of the draws.
        """
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(
            int(num_samples), self.loc.numel(), generator=generator, dtype=self.loc.dtype
        )
        draws = self.loc + (noise / self.eigenvalues.sqrt()) @ self.eigenvectors.T
        return self.constrained(draws)

    def __repr__(self) -> str:
        return (
            f"LaplacePosterior(sites={list(self.sites.names)}, dim={self.loc.numel()}, "
            f"nll={self.nll:.6g}, includes_priors={self.includes_priors}, "
            f"num_clamped={self.num_clamped}, "
            f"mode_offset={self.mode_offset:.3g})"
        )


class _LowerTriangle(Transform):
    """The ``n (n + 1) / 2`` entries on and below the diagonal of ``(..., n, n)`` matrices, from
    a vector (zeros above the diagonal). Followed by a map that reads only those entries (the
    ``transform_to`` of a Cholesky-type constraint), it is a bijection from free coordinates."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.rows, self.cols = torch.tril_indices(size, size)

    def _call(self, vector):
        matrix = vector.new_zeros(vector.shape[:-1] + (self.size, self.size))
        matrix[..., self.rows, self.cols] = vector
        return matrix

    def _inverse(self, matrix):
        return matrix[..., self.rows, self.cols]

    def forward_shape(self, shape):
        return tuple(shape[:-1]) + (self.size, self.size)

    def inverse_shape(self, shape):
        return tuple(shape[:-2]) + (self.rows.numel(),)


# Constraints whose Pyro parameterisation (``transform_to``) reads only the lower triangle of an
# unconstrained square matrix; torch has no ``biject_to`` for them.
_TRIANGULAR = (constraints.positive_definite, constraints.lower_cholesky)


class _TriangularBijection(Transform):
    """Pyro's parameterisation ``transform_to(constraint)`` of a positive definite or lower
    Cholesky matrix, from the ``n (n + 1) / 2`` free entries of the lower triangle it reads, with
    the log-Jacobian torch does not provide.

    ``transform_to`` makes ``L`` from the triangle (the diagonal exponentiated, ``L_ii = exp
    d_i``) and, for a positive definite matrix, ``S = L L^T``. In the free entries,
    ``log|det dL/dv| = sum_i d_i`` and ``log|det dS/dL| = n log 2 + sum_i (n - i + 1) d_i``
    (``i = 1..n``, over the distinct entries of ``S``; e.g. Muirhead, 1982, Theorem 2.1.9).
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True

    def __init__(self, constraint, size: int):
        super().__init__()
        self.triangle = _LowerTriangle(size)
        self.matrix = transform_to(constraint)
        # Each d_i's weight in the log-Jacobian: 1 for L, n - i + 2 (i = 1..n) for L L^T.
        weights = torch.ones(size)
        if constraint is constraints.positive_definite:
            weights = size + 1 - torch.arange(size, dtype=torch.float64)
        self.diagonal_weights = weights
        self.constant = size * math.log(2.0) if constraint is constraints.positive_definite else 0

    def _call(self, vector):
        return self.matrix(self.triangle(vector))

    def _inverse(self, matrix):
        return self.triangle.inv(self.matrix.inv(matrix))

    def log_abs_det_jacobian(self, vector, matrix):
        diagonal = self.triangle(vector).diagonal(dim1=-2, dim2=-1)
        weights = self.diagonal_weights.to(diagonal.dtype)
        return (diagonal * weights).sum(-1) + self.constant

    def forward_shape(self, shape):
        return self.triangle.forward_shape(shape)

    def inverse_shape(self, shape):
        return self.triangle.inverse_shape(shape)


def _site_bijection(name: str, constraint, shape) -> Transform:
    """The bijection from unconstrained coordinates to the values of site ``name``:
    ``biject_to(constraint)``, or for a positive definite (or lower Cholesky) matrix its Pyro
    parameterisation from the lower triangle.

    :raises ValueError: for a constraint with neither.
    """
    try:
        return biject_to(constraint)
    except NotImplementedError:
        pass
    base = constraint
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    if any(base is triangular for triangular in _TRIANGULAR):
        return _TriangularBijection(base, shape[-1])
    raise ValueError(
        f"the parameter site {name!r} has constraint {constraint}, for which there is no "
        "bijection to unconstrained coordinates: the Laplace approximation cannot cover it"
    )


def _bijections(sites: ParameterSites) -> dict:
    return {
        name: _site_bijection(name, sites.constraints[name], sites.shapes[name])
        for name in sites.names
    }


def _constrained(sites: ParameterSites, unconstrained: torch.Tensor) -> dict:
    return _constrained_and_log_jacobian(sites, unconstrained, with_log_jacobian=False)[0]


def _constrained_and_log_jacobian(
    sites: ParameterSites, unconstrained: torch.Tensor, with_log_jacobian: bool = True
):
    """Site values from unconstrained vectors ``(..., d)``, and the log-Jacobian of the
    bijections of the sites with priors (``pyro.sample`` sites), summed: the term that carries
    their prior density to the unconstrained coordinates (``0`` without priors, or without
    ``with_log_jacobian``: the draws of :meth:`LaplacePosterior.sample` need only values)."""
    values, start, log_jacobian = {}, 0, unconstrained.new_zeros(())
    batch = unconstrained.shape[:-1]
    for name, bijection in _bijections(sites).items():
        shape = bijection.inverse_shape(sites.shapes[name])
        size = math.prod(shape)
        block = unconstrained[..., start : start + size].reshape(batch + tuple(shape))
        values[name] = bijection(block)
        if with_log_jacobian and sites.kinds[name] == "sample":
            log_jacobian = log_jacobian + bijection.log_abs_det_jacobian(block, values[name]).sum()
        start += size
    return values, log_jacobian


def _unconstrained_vector(sites: ParameterSites, values: dict) -> torch.Tensor:
    blocks = [
        bijection.inv(values[name]).reshape(-1) for name, bijection in _bijections(sites).items()
    ]
    return torch.cat(blocks)


def laplace_posterior(
    model: MixtureOfExperts,
    x,
    y,
    *,
    at: dict = None,
    min_eigenvalue: float = 1e-2,
    max_mode_offset: float = 3.0,
    priors: bool = True,
) -> LaplacePosterior:
    """Laplace approximation of the posterior at a point estimate of ``model``.

    Fit the model first (``IncrementalMM`` and ``EM`` write their estimate into the model).
    The Hessian is that of the negative log-posterior density in unconstrained coordinates:
    the full-data NLL, and for the parameters with priors (a model built with ``MoEPriors``)
    minus their log prior and the log-Jacobian of their bijections, as
    :class:`pyro.infer.autoguide.AutoLaplaceApproximation` has it (see the module docstring).

    :param MixtureOfExperts model: a fitted pyro_mm model (float64 recommended: the Hessian is
        computed in the model's dtype).
    :param x: inputs ``(N, P)`` of the full data set.
    :param y: outputs of the full data set.
    :param dict at: the point estimate as site values ``name -> tensor`` (e.g. an AutoDelta
        guide's ``median()``); default: the model's current parameters.
    :param float min_eigenvalue: eigenvalues of the Hessian below this precision are raised to
        it, with a warning: a non-positive or tiny curvature (an empty expert, a redundant one,
        a saddle point) would otherwise give an infinite or undefined covariance. The default
        ``1e-2`` gives such directions a standard deviation of 10 unconstrained units (the scale
        of :class:`~pyro_mm.models.priors.MoEPriors`' default weight prior); any direction the
        data inform has a far larger curvature and is left unchanged.
    :param float max_mode_offset: warn when the point lies further than this many posterior
        standard deviations from the mode of the quadratic expansion (the point is then not a
        stationary point of the expanded density: fit longer, or with EM).
    :param bool priors: include the priors the model declares (``False``: the likelihood alone,
        a flat prior in the unconstrained coordinates for every parameter).
    :returns: the :class:`LaplacePosterior`.
    """
    if not min_eigenvalue > 0:
        raise ValueError(f"min_eigenvalue must be positive, got {min_eigenvalue!r}")
    if not max_mode_offset > 0:
        raise ValueError(f"max_mode_offset must be positive, got {max_mode_offset!r}")
    x = model.check_x(x)
    y = model.check_y(y, x.shape[0])
    with module_parameters_only():
        return _laplace_posterior(model, x, y, at, min_eigenvalue, max_mode_offset, priors)


def _laplace_posterior(
    model, x, y, at, min_eigenvalue, max_mode_offset, priors
) -> LaplacePosterior:
    sites = parameter_sites(model, x, y)
    at = sites.values if at is None else at
    missing = set(sites.names) - set(at)
    if missing:
        raise ValueError(f"`at` has no value for the parameter site(s) {sorted(missing)}")
    dtype = model.dtype
    loc = _unconstrained_vector(sites, {name: at[name].to(dtype) for name in sites.names})

    with_priors = priors and sites.has_priors

    def negative_log_density(unconstrained: torch.Tensor):
        """``(negative log-posterior density in unconstrained coordinates, NLL)``."""
        values, log_jacobian = _constrained_and_log_jacobian(sites, unconstrained, with_priors)
        trace = poutine.trace(fix_sites(model, sites, values)).get_trace(x, y)
        observed = trace.nodes["y"]
        nll = -observed["fn"].log_prob(observed["value"]).sum()
        if not with_priors:
            return nll, nll
        log_prior = sum(
            trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"]).sum()
            for name in sites.names
            if sites.kinds[name] == "sample"
        )
        return nll - log_prior - log_jacobian, nll

    with torch.enable_grad():
        point = loc.detach().requires_grad_(True)
        objective, nll = negative_log_density(point)
        (gradient,) = torch.autograd.grad(objective, point)
        hessian = torch.autograd.functional.hessian(
            lambda unconstrained: negative_log_density(unconstrained)[0], loc.detach()
        )
    hessian = 0.5 * (hessian + hessian.T)
    expanded = "negative log-posterior" if with_priors else "NLL"
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    largest = eigenvalues.max()
    if not largest > 0:
        raise ValueError(
            f"the Hessian of the {expanded} has no positive curvature at this point (largest "
            f"eigenvalue {largest.item():.3g}); is the model fitted?"
        )
    clamped = eigenvalues < min_eigenvalue
    num_clamped = int(clamped.sum())
    if num_clamped:
        warnings.warn(
            f"the Hessian of the {expanded} is not positive definite enough: {num_clamped} of "
            f"{eigenvalues.numel()} eigenvalues are below min_eigenvalue={min_eigenvalue:g} "
            f"(smallest {eigenvalues.min().item():.3g}, largest {largest.item():.3g}); they were "
            "raised to it, which makes those directions of the Laplace posterior wide (their "
            "spread is set by min_eigenvalue, not by the data). Typical causes: an expert with "
            "(almost) no data, more experts than the data support, or a point that is not a "
            "minimum.",
            stacklevel=3,
        )
    approximation = LaplacePosterior(
        sites,
        loc,
        hessian=hessian.detach(),
        gradient=gradient.detach(),
        eigenvalues=eigenvalues.clamp_min(min_eigenvalue).detach(),
        eigenvectors=eigenvectors.detach(),
        num_clamped=num_clamped,
        nll=nll.item(),
        includes_priors=with_priors,
    )
    offset = approximation.mode_offset
    if offset > max_mode_offset:
        warnings.warn(
            f"the point estimate is {offset:.3g} posterior standard deviations away from the "
            f"mode of the quadratic expansion of the full-data {expanded} (the gradient there is "
            "not zero); the Laplace approximation assumes a minimum: fit to convergence (e.g. with "
            "EM or more MM epochs) before calling laplace_posterior",
            stacklevel=3,
        )
    return approximation
