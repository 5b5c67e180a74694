r"""The cubic and quadratic transforms of the outputs (Makkuva et al., Appendix C).

With ``Z ~ N(0, 1)`` and ``Y | Z ~ N(g(Z), sigma^2)``, the transforms
``P3(y) = y^3 + alpha y^2 + beta y`` and ``P2(y) = y^2 + gamma y`` have conditional means

.. math:: h_3(Z) = E[P_3(Y) | Z] = g^3 + \alpha g^2 + (\beta + 3\sigma^2) g + \alpha\sigma^2,
          \qquad h_2(Z) = g^2 + \gamma g + \sigma^2.

By Stein's identity ``E[h'(Z)] = E[h(Z) He_1(Z)]`` and ``E[h''(Z)] = E[h(Z) He_2(Z)]`` with the
Hermite polynomials ``He_1 = z``, ``He_2 = z^2 - 1``, ``He_3 = z^3 - 3z``. Choosing
``(alpha, beta)`` so that ``E[h_3 He_1] = E[h_3 He_2] = 0`` and ``gamma`` so that
``E[h_2 He_1] = 0`` cancels every term of ``E[P3(y) S3(x)]`` and ``E[P2(y) S2(x)]`` that
involves the gate (when the gate is orthogonal to the experts), leaving

.. math:: T_3 = c \sum_i \pi_i a_i^{\otimes 3}, \quad T_2 = c' \sum_i \pi_i a_i a_i^\top,
          \qquad c = E[h_3 He_3], \quad c' = E[h_2 He_2], \quad \pi_i = E[P(z = i | x)].

Writing the conditions through Stein's identity needs no derivative of ``g``, so a kinked link
(ReLU) gets the delta terms of its derivatives right. The paper's printed ReLU constants drop
them; the correct ones are ``alpha = -3 sqrt(pi/2) / (pi - 2)``,
``beta = 6 / (pi - 2) - 3 - 3 sigma^2``, ``gamma = -2 sqrt(2/pi)``.
"""

import dataclasses
import math

import torch

from .links import Link, as_link, standard_normal_quadrature

__all__ = ["TransformConstants", "transform_constants"]

# |c| (resp. |c'|) below this fraction of its Cauchy-Schwarz bound ||h - E h|| ||He_m||: the
# rank-one signal of T3 (resp. T2) is numerically absent.
_SIGNAL_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class TransformConstants:
    """Coefficients of ``P3``, ``P2`` and the scales ``c``, ``c'`` of the tensors they give.

    :ivar float alpha: ``y^2`` coefficient of ``P3``.
    :ivar float beta: ``y`` coefficient of ``P3``.
    :ivar float gamma: ``y`` coefficient of ``P2``.
    :ivar float c3: ``c = E[h_3(Z) He_3(Z)]``, the scale of ``T3``.
    :ivar float c2: ``c' = E[h_2(Z) He_2(Z)]``, the scale of ``T2``.
    :ivar str link: name of the link they were computed for.
    :ivar float noise_std: the ``sigma`` they were computed for.
    """

    alpha: float
    beta: float
    gamma: float
    c3: float
    c2: float
    link: str
    noise_std: float

    def cubic(self, y: torch.Tensor) -> torch.Tensor:
        """``P3(y) = y^3 + alpha y^2 + beta y``."""
        return y * (y * (y + self.alpha) + self.beta)

    def quadratic(self, y: torch.Tensor) -> torch.Tensor:
        """``P2(y) = y^2 + gamma y``."""
        return y * (y + self.gamma)


def transform_constants(link="identity", noise_std: float = None) -> TransformConstants:
    """Solves the cancellation conditions for ``(alpha, beta, gamma)`` by quadrature.

    :param link: the experts' link: ``"identity"``, ``"sigmoid"``, ``"relu"``, a
        :class:`~pyro_mm.spectral.links.Link` or a smooth torch callable.
    :param float noise_std: the noise standard deviation ``sigma >= 0`` (known; the transforms
        depend on it).
    :raises ValueError: when ``sigma`` is missing or invalid, when the linear system for
        ``(alpha, beta)`` or the equation for ``gamma`` is singular (an even link, say), or when
        ``c`` or ``c'`` is near zero (the tensors carry no signal): such a link is not
        ``(alpha, beta, gamma)``-valid.
    """
    link: Link = as_link(link)
    if noise_std is None:
        raise ValueError(
            "noise_std (sigma) is required: the transforms P3, P2 depend on the noise level, "
            "which the spectral method assumes known"
        )
    noise_std = float(noise_std)
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
    nodes, weights = standard_normal_quadrature(link.breakpoints)
    g = link(nodes)
    if g.shape != nodes.shape or not torch.isfinite(g).all():
        raise ValueError(f"link {link.name!r} must map reals to finite reals element-wise")
    hermite = (nodes, nodes**2 - 1, nodes**3 - 3 * nodes)

    def mean(values):
        return float((weights * values).sum())

    variance = 3 * noise_std**2
    g2, g3 = g**2, g**3
    system = torch.tensor(
        [
            [mean(g2 * hermite[0]), mean(g * hermite[0])],
            [mean(g2 * hermite[1]), mean(g * hermite[1])],
        ],
        dtype=torch.float64,
    )
    rhs = -torch.tensor(
        [
            mean(g3 * hermite[0]) + variance * mean(g * hermite[0]),
            mean(g3 * hermite[1]) + variance * mean(g * hermite[1]),
        ],
        dtype=torch.float64,
    )
    scale = system.abs().max().item()
    if scale == 0 or abs(torch.linalg.det(system).item()) <= 1e-10 * scale**2:
        raise ValueError(
            f"link {link.name!r} is not (alpha, beta, gamma)-valid: the equations "
            f"E[h3 He1] = E[h3 He2] = 0 do not determine (alpha, beta) (matrix {system.tolist()})"
        )
    alpha, beta = torch.linalg.solve(system, rhs).tolist()
    slope = mean(g * hermite[0])
    if abs(slope) <= 1e-10 * max(mean(g2), 1e-300) ** 0.5:
        raise ValueError(
            f"link {link.name!r} is not (alpha, beta, gamma)-valid: E[g(Z) Z] = {slope:.3g} ~ 0, "
            f"so no gamma cancels the gate's contribution to T2"
        )
    gamma = -mean(g2 * hermite[0]) / slope
    h3 = g3 + alpha * g2 + (beta + variance) * g
    h2 = g2 + gamma * g
    c3, c2 = mean(h3 * hermite[2]), mean(h2 * hermite[1])
    for name, c, h, order in (("c", c3, h3, 3), ("c'", c2, h2, 2)):
        spread = mean((h - mean(h)) ** 2) ** 0.5 * math.sqrt(math.factorial(order))
        if abs(c) <= _SIGNAL_TOLERANCE * spread:
            raise ValueError(
                f"link {link.name!r} with noise_std={noise_std} gives {name} = {c:.3g}, near zero "
                f"(< {_SIGNAL_TOLERANCE} of its bound {spread:.3g}): the moment tensor carries no "
                f"signal of the experts and the spectral method cannot recover them"
            )
    return TransformConstants(alpha, beta, gamma, c3, c2, link.name, noise_std)
