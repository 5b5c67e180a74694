r"""Step-size schedules ``gamma_n`` of the stochastic-approximation recursion
``s_{n+1} = s_n + gamma_{n+1} (S(theta_n; z_{n+1}) - s_n)``.

A schedule is any callable ``n -> gamma_n`` (``n = 1, 2, ...``) with values in ``(0, 1]``.
"""

__all__ = ["PowerDecay", "ConstantStep", "ConstantThenDecay"]


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


class ConstantThenDecay:
    r"""A constant step, then a power decay: ``gamma_n = gamma`` for ``n <= decay_start`` and
    ``gamma_n = gamma (decay_start / n)^{alpha}`` after (continuous at ``decay_start``).

    The constant phase moves the statistics a fixed share towards each batch's, so the iterate
    travels as far in a few passes as a constant step does; a constant step, though, leaves a
    noise floor (the statistics average only the last ``~1 / gamma`` batches). The decaying tail
    satisfies the Robbins-Monro conditions (``sum gamma_n = inf``, ``sum gamma_n^2 < inf`` for
    ``alpha in (1/2, 1]``), so the noise vanishes; with ``alpha < 1`` and the iterates averaged
    over the tail (``polyak_start`` of :class:`~pyro_mm.infer.IncrementalMM` after
    ``decay_start``) it is the Polyak-Ruppert setting, whose average converges at the optimal
    ``1 / n`` rate.

    :param float gamma: the constant step in ``(0, 1]``.
    :param int decay_start: the last step of the constant phase (a positive integer).
    :param float alpha: decay exponent in ``(1/2, 1]``.
    """

    def __init__(self, gamma: float = 1.0, decay_start: int = 1, alpha: float = 0.75):
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        if isinstance(decay_start, bool) or int(decay_start) != decay_start or decay_start < 1:
            raise ValueError(f"decay_start must be a positive integer, got {decay_start!r}")
        if not 0.5 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (1/2, 1] (Robbins-Monro), got {alpha}")
        self.gamma = float(gamma)
        self.decay_start = int(decay_start)
        self.alpha = float(alpha)

    def __call__(self, n: int) -> float:
        if n <= self.decay_start:
            return self.gamma
        return self.gamma * (self.decay_start / float(n)) ** self.alpha

    def __repr__(self) -> str:
        return (
            f"ConstantThenDecay(gamma={self.gamma}, decay_start={self.decay_start}, "
            f"alpha={self.alpha})"
        )
