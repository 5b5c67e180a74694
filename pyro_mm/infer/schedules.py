r"""Step-size schedules ``gamma_n`` of the stochastic-approximation recursion
``s_{n+1} = s_n + gamma_{n+1} (S(theta_n; z_{n+1}) - s_n)``.

A schedule is any callable ``n -> gamma_n`` (``n = 1, 2, ...``) with values in ``(0, 1]``.
"""

__all__ = ["PowerDecay", "ConstantStep"]


class PowerDecay:
    r"""``gamma_n = gamma_0 n^{-alpha}``, the paper's choice; ``alpha in (1/2, 1]`` satisfies the
    Robbins-Monro conditions.

    :param float gamma0: initial step ``gamma_0 in (0, 1]``.
    :param float alpha: decay exponent in ``(1/2, 1]``.
    """

    def __init__(self, gamma0: float = 1.0, alpha: float = 0.6):
        if not 0.0 < gamma0 <= 1.0:
            raise ValueError(f"gamma0 must lie in (0, 1], got {gamma0}")
        if not 0.5 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (1/2, 1] (Robbins-Monro), got {alpha}")
        self.gamma0 = float(gamma0)
        self.alpha = float(alpha)

    def __call__(self, n: int) -> float:
        return self.gamma0 * float(n) ** (-self.alpha)

    def __repr__(self) -> str:
        return f"PowerDecay(gamma0={self.gamma0}, alpha={self.alpha})"


class ConstantStep:
    """``gamma_n = gamma``; ``gamma = 1`` on the full data set is batch MM.

    :param float gamma: the step in ``(0, 1]``.
    """

    def __init__(self, gamma: float = 1.0):
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, n: int) -> float:
        return self.gamma

    def __repr__(self) -> str:
        return f"ConstantStep({self.gamma})"
