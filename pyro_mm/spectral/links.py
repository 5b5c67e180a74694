"""Expert links ``g`` of the model ``y = g(a_z^T x) + sigma * eps`` and expectations under
``Z ~ N(0, 1)`` by quadrature.

A link is a torch function plus the points where it is not smooth. Smooth links are integrated
by Gauss-Hermite quadrature (exact for polynomial links such as the identity). At a kink the
integrand is only piecewise smooth and Gauss-Hermite converges slowly (``E|Z|^3`` is off by
``1e-5`` with 200 nodes), so a link with breakpoints is integrated by composite Gauss-Legendre
panels on ``[-16, 16]`` split at the breakpoints (the Gaussian tail beyond 16 is ``< 1e-56``).
"""

import dataclasses
import math
from typing import Callable, Union

import numpy as np
import torch

__all__ = ["Link", "LINKS", "as_link", "standard_normal_quadrature"]

_HERMITE_NODES = 150
_PANEL_NODES = 16
_PANEL_EDGES = np.linspace(-16.0, 16.0, 65)


@dataclasses.dataclass(frozen=True)
class Link:
    """An expert link ``g``.

    :ivar str name: a readable name.
    :ivar callable fn: ``g`` applied element-wise to a float64 torch tensor.
    :ivar tuple breakpoints: points where ``g`` is not smooth (``(0.0,)`` for the ReLU); the
        quadrature splits the real line there.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    breakpoints: tuple = ()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.fn(t)


LINKS = {
    "identity": Link("identity", lambda t: t),
    "sigmoid": Link("sigmoid", torch.sigmoid),
    "relu": Link("relu", torch.relu, breakpoints=(0.0,)),
}


def as_link(spec: Union[str, Link, Callable]) -> Link:
    """A :class:`Link` from a built-in name (``"identity"``, ``"sigmoid"``, ``"relu"``), a
    :class:`Link`, or a torch callable (assumed smooth; wrap it in a :class:`Link` with its
    ``breakpoints`` otherwise)."""
    if isinstance(spec, Link):
        return spec
    if isinstance(spec, str):
        if spec not in LINKS:
            raise ValueError(f"unknown link {spec!r}; built-in links are {sorted(LINKS)}")
        return LINKS[spec]
    if callable(spec):
        return Link(getattr(spec, "__name__", repr(spec)), spec)
    raise TypeError(f"a link must be a name, a Link or a callable, got {spec!r}")


def standard_normal_quadrature(breakpoints=()):
    """Nodes and weights ``(z_j, w_j)`` with ``sum_j w_j f(z_j) ~ E[f(Z)]``, ``Z ~ N(0, 1)``.

    :param breakpoints: points where the integrand is not smooth (none: Gauss-Hermite).
    :returns: two float64 tensors of equal length.
    """
    if not breakpoints:
        nodes, weights = np.polynomial.hermite_e.hermegauss(_HERMITE_NODES)
        weights = weights / math.sqrt(2 * math.pi)
    else:
        edges = np.union1d(_PANEL_EDGES, np.clip(np.asarray(breakpoints, float), -16.0, 16.0))
        unit_nodes, unit_weights = np.polynomial.legendre.leggauss(_PANEL_NODES)
        left, right = edges[:-1, None], edges[1:, None]
        half = (right - left) / 2
        nodes = (half * unit_nodes + (left + right) / 2).ravel()
        weights = (half * unit_weights).ravel() * np.exp(-0.5 * nodes**2) / math.sqrt(2 * math.pi)
    return torch.from_numpy(nodes), torch.from_numpy(weights)
