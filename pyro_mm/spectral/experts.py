r"""Algorithm 1 of Makkuva et al.: the experts' directions from two cross-moments, without the gate.

With ``M2 = T2 / c' = sum_i pi_i a_i a_i^T`` and ``M3 = T3 / c = sum_i pi_i a_i^{(x)3}``
(:mod:`~pyro_mm.spectral.transforms`), whiten by the top-``k`` eigenpairs of ``M2``,
``W = U_k Lambda_k^{-1/2}``, so that ``v_i = sqrt(pi_i) W^T a_i`` are orthonormal and
``M3(W, W, W) = sum_i pi_i^{-1/2} v_i^{(x)3}``; the tensor power method returns
``(lambda_i, v_i)`` and ``a_i = lambda_i U_k Lambda_k^{1/2} v_i``, ``pi_i = lambda_i^{-2}``.
Dividing by ``c`` and ``c'`` before decomposing fixes the signs (``sign(c / c')`` in the paper):
every ``lambda_i`` is positive.
"""

import dataclasses

import torch

from ..validation import as_tensor, check_features, check_finite
from .gaussianity import warn_if_not_standard_gaussian
from .scores import GaussianMixtureScore
from .tensor_power import tensor_power_method
from .transforms import TransformConstants, transform_constants

__all__ = ["SpectralExperts", "spectral_experts"]


@dataclasses.dataclass
class SpectralExperts:
    """The experts recovered from the moment tensors.

    :ivar torch.Tensor directions: ``(k, d)`` unit vectors ``a_i / ||a_i||``.
    :ivar torch.Tensor norms: ``(k,)`` norms ``||a_i||`` of the un-whitened components (``~1``
        under the paper's model, where ``||a_i|| = 1``).
    :ivar torch.Tensor mixing_weights: ``(k,)`` estimates of ``pi_i = E[P(z = i | x)]``.
    :ivar torch.Tensor tensor_eigenvalues: ``(k,)`` eigenvalues ``lambda_i`` of the whitened tensor.
    :ivar torch.Tensor moment_eigenvalues: ``(d,)`` eigenvalues of ``M2 = T2 / c'``, descending
        (``k`` clearly positive ones and ``d - k`` near zero when the model holds).
    :ivar TransformConstants constants: the transforms used.
    """

    directions: torch.Tensor
    norms: torch.Tensor
    mixing_weights: torch.Tensor
    tensor_eigenvalues: torch.Tensor
    moment_eigenvalues: torch.Tensor
    constants: TransformConstants

    @property
    def vectors(self) -> torch.Tensor:
        """``(k, d)`` the un-normalised components ``a_i``."""
        return self.directions * self.norms.unsqueeze(-1)


def check_regression_data(x, y):
    """Validates ``(x, y)`` for the spectral method: float64 ``(N, d)`` and ``(N,)``, finite."""
    x = as_tensor("x", x, torch.float64)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, d), got {tuple(x.shape)}")
    x = check_features(x, x.shape[1], torch.float64)
    y = as_tensor("y", y, torch.float64)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.squeeze(-1)
    if y.dim() != 1:
        raise ValueError(f"y must have shape (N,) or (N, 1) (one output), got {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    check_finite("y", y)
    return x, y


def spectral_experts(
    x,
    y,
    num_experts: int,
    *,
    link="identity",
    noise_std: float = None,
    constants: TransformConstants = None,
    score: GaussianMixtureScore = None,
    restarts: int = 10,
    iterations: int = 100,
    seed: int = 0,
    gaussian_test_level: float = 1e-3,
) -> SpectralExperts:
    """Estimates the experts of ``y = g(a_z^T x) + sigma eps`` from ``T2`` and ``T3``.

    :param x: ``(N, d)`` inputs, ``x ~ N(0, I_d)`` in the paper's model (else pass ``score``).
    :param y: ``(N,)`` outputs.
    :param int num_experts: ``k <= d``.
    :param link: the experts' link (see :func:`~pyro_mm.spectral.transforms.transform_constants`).
    :param float noise_std: the known noise level ``sigma``.
    :param TransformConstants constants: precomputed transforms (then ``link`` and
        ``noise_std`` are not used).
    :param GaussianMixtureScore score: the input density's score (default: ``N(0, I_d)``, and
        ``x`` is tested for it, with a :class:`NonGaussianInputWarning` when it fails).
    :param int restarts: random starts per component of the tensor power method.
    :param int iterations: power steps per start.
    :param int seed: seed of the random starts.
    :param float gaussian_test_level: level of the Gaussianity tests (``0`` skips them).
    :raises ValueError: for ``k > d``, fewer rows than needed, an invalid link or noise level,
        or when ``M2`` has fewer than ``k`` positive eigenvalues.
    """
    x, y = check_regression_data(x, y)
    num_rows, dim = x.shape
    if isinstance(num_experts, bool) or int(num_experts) != num_experts or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if num_experts > dim:
        raise ValueError(
            f"the spectral method needs num_experts <= in_features (linearly independent "
            f"experts), got num_experts={num_experts} > d={dim}"
        )
    if num_rows <= dim:
        raise ValueError(f"need more rows than input dimensions, got N={num_rows}, d={dim}")
    if constants is None:
        constants = transform_constants(link, noise_std)
    if score is None:
        score = GaussianMixtureScore.standard(dim)
        if gaussian_test_level > 0:
            warn_if_not_standard_gaussian(x, gaussian_test_level, stacklevel=3)
    # E[S_m(x)] = 0, so centring P(y) leaves the population tensors unchanged and removes the
    # term mean(P) * (sample mean of S_m), pure sampling noise.
    cubic = constants.cubic(y)
    quadratic = constants.quadratic(y)
    second = score.second_moment(x, quadratic - quadratic.mean()) / constants.c2
    moment_eigenvalues, eigenvectors = torch.linalg.eigh(second)
    moment_eigenvalues, eigenvectors = moment_eigenvalues.flip(0), eigenvectors.flip(1)
    top = moment_eigenvalues[:num_experts]
    if top[-1] <= 0:
        positive = int((moment_eigenvalues > 0).sum())
        leading = moment_eigenvalues[: num_experts + 1].tolist()
        raise ValueError(
            f"M2 = T2 / c' has only {positive} positive eigenvalue(s), fewer than "
            f"num_experts={num_experts} (eigenvalues {leading}): "
            f"too many experts for these data, an expert with ~zero weight, too few samples, or a "
            f"wrong link / noise_std"
        )
    basis = eigenvectors[:, :num_experts]
    whitening = basis * top.rsqrt()
    whitened = score.whitened_third_moment(x, cubic - cubic.mean(), whitening) / constants.c3
    generator = torch.Generator().manual_seed(seed)
    decomposition = tensor_power_method(
        whitened, num_experts, restarts=restarts, iterations=iterations, generator=generator
    )
    eigenvalues = decomposition.eigenvalues
    vectors = eigenvalues.unsqueeze(-1) * (decomposition.eigenvectors * top.sqrt()) @ basis.T
    norms = vectors.norm(dim=-1)
    return SpectralExperts(
        directions=vectors / norms.unsqueeze(-1),
        norms=norms,
        mixing_weights=eigenvalues.clamp_min(1e-300).pow(-2),
        tensor_eigenvalues=eigenvalues,
        moment_eigenvalues=moment_eigenvalues,
        constants=constants,
    )
