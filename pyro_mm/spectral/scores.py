r"""Score functions of the input density and the moment tensors built from them.

For an input density ``p``, the ``m``-th order score ``S_m(x) = (-1)^m \nabla^m p(x) / p(x)``
satisfies Stein's identity ``E[f(x) S_m(x)] = E[\nabla^m f(x)]``. For a Gaussian mixture
``p = sum_j pi_j N(mu_j, Sigma_j)``, with ``u_j = Sigma_j^{-1}(x - mu_j)``,
``P_j = Sigma_j^{-1}`` and ``r_j(x)`` the posterior of component ``j``,

.. math:: S_2(x) = \sum_j r_j(x)\,(u_j u_j^\top - P_j), \qquad
          S_3(x) = \sum_j r_j(x)\,\big(u_j^{\otimes 3} - \mathrm{sym}(u_j \otimes P_j)\big),

where ``sym(u (x) P)_{abc} = u_a P_bc + u_b P_ac + u_c P_ab``. One standard Gaussian component
gives the paper's ``S2 = xx^T - I`` and ``S3_{jkl} = x_j x_k x_l - x_j d_kl - x_k d_jl - x_l d_jk``.

Only the ``d x d`` matrix ``mean w_n S2(x_n)`` and the whitened ``k x k x k`` tensor
``mean w_n S3(x_n)(W, W, W)`` are ever formed: ``O(n d^2 + n k^3)`` work, never a ``d^3`` array.
"""

import torch

__all__ = ["GaussianMixtureScore"]


class GaussianMixtureScore:
    """Score functions of a Gaussian-mixture input density (one component: a Gaussian).

    :param weights: ``(J,)`` mixing weights (positive, summing to one).
    :param means: ``(J, d)`` component means.
    :param covariances: ``(J, d, d)`` component covariances (symmetric positive definite).
    """

    def __init__(self, weights, means, covariances):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        if weights.dim() != 1 or means.dim() != 2 or covariances.dim() != 3:
            raise ValueError(
                "weights, means, covariances must have shapes (J,), (J, d), (J, d, d), got "
                f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(covariances.shape)}"
            )
        num_components, dim = means.shape
        if weights.shape[0] != num_components or covariances.shape != (num_components, dim, dim):
            raise ValueError(
                f"inconsistent mixture shapes: weights {tuple(weights.shape)}, means "
                f"{tuple(means.shape)}, covariances {tuple(covariances.shape)}"
            )
        if (weights <= 0).any() or abs(weights.sum().item() - 1) > 1e-8:
            raise ValueError(
                f"mixture weights must be positive and sum to one, got {weights.tolist()}"
            )
        factor, info = torch.linalg.cholesky_ex(covariances)
        if (info > 0).any():
            raise ValueError("every component covariance must be symmetric positive definite")
        self.weights, self.means, self.covariances = weights, means, covariances
        self.precisions = torch.cholesky_inverse(factor)
        self._log_det = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        self.in_features = dim

    @classmethod
    def standard(cls, in_features: int) -> "GaussianMixtureScore":
        """The score of ``N(0, I_d)`` (the paper's assumption)."""
        return cls(
            torch.ones(1),
            torch.zeros(1, in_features),
            torch.eye(in_features, dtype=torch.float64).unsqueeze(0),
        )

    @classmethod
    def fit(cls, x, num_components: int, seed: int = 0, **options) -> "GaussianMixtureScore":
        """The score of a Gaussian mixture fitted to ``x`` by scikit-learn (full covariances).

        :param x: ``(N, d)`` inputs.
        :param int num_components: mixture components ``J``.
        :param int seed: seed of the mixture's initialisation.
        :param options: passed to :class:`sklearn.mixture.GaussianMixture`.
        """
        from sklearn.mixture import GaussianMixture

        if options.get("covariance_type", "full") != "full":
            raise ValueError(
                f"GaussianMixtureScore.fit needs covariance_type='full', got "
                f"{options['covariance_type']!r}"
            )
        data = torch.as_tensor(x, dtype=torch.float64).numpy()
        fitted = GaussianMixture(num_components, random_state=seed, **options).fit(data)
        return cls(fitted.weights_ / fitted.weights_.sum(), fitted.means_, fitted.covariances_)

    def _components(self, x: torch.Tensor):
        """Per component: posterior ``r_j`` ``(N,)``, ``u_j`` ``(N, d)``, precision ``P_j``."""
        centred = x.unsqueeze(-3) - self.means.unsqueeze(-2)  # (J, N, d)
        u = centred @ self.precisions  # precisions are symmetric
        log_density = -0.5 * ((u * centred).sum(-1) + self._log_det.unsqueeze(-1))
        posterior = torch.softmax(log_density + self.weights.log().unsqueeze(-1), dim=0)
        return posterior, u, self.precisions

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"x must have shape (N, {self.in_features}) for this score, got {tuple(x.shape)}"
            )

    def second_moment(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``mean_n weight_n S2(x_n)``, a symmetric ``(d, d)`` matrix."""
        self._check_x(x)
        posterior, u, precision = self._components(x)
        row_weight = posterior * weight / x.shape[0]  # (J, N)
        moment = (u.transpose(-1, -2) @ (row_weight.unsqueeze(-1) * u)).sum(0)
        moment = moment - (row_weight.sum(-1)[:, None, None] * precision).sum(0)
        return 0.5 * (moment + moment.T)

    def whitened_third_moment(
        self, x: torch.Tensor, weight: torch.Tensor, whitening: torch.Tensor
    ) -> torch.Tensor:
        """``mean_n weight_n S3(x_n)(W, W, W)``, a symmetric ``(k, k, k)`` tensor.

        :param torch.Tensor whitening: ``W``, shape ``(d, k)``.
        """
        self._check_x(x)
        posterior, u, precision = self._components(x)
        row_weight = posterior * weight / x.shape[0]  # (J, N)
        projected = u @ whitening  # (J, N, k)
        cubic = torch.einsum("jn,jna,jnb,jnc->abc", row_weight, projected, projected, projected)
        first = torch.einsum("jn,jna->ja", row_weight, projected)
        gram = whitening.T @ precision @ whitening  # (J, k, k)
        cross = torch.einsum("ja,jbc->abc", first, gram)
        return cubic - cross - cross.permute(1, 0, 2) - cross.permute(1, 2, 0)
