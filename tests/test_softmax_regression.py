import torch

from pyro_mm.surrogates import fit_softmax_regression, softmax_regression_loss


def _problem(seed, num_rows=3000, num_features=5, num_classes=4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, num_features, generator=generator, dtype=torch.float64)
    x[:, 0] = 1.0
    weight = torch.randn(num_classes - 1, num_features, generator=generator, dtype=torch.float64)
    probs = torch.softmax(torch.nn.functional.pad(x @ weight.T, (0, 1)), -1)
    targets = torch.distributions.Dirichlet(20 * probs + 0.1).sample()
    sample_weight = torch.rand(num_rows, generator=generator, dtype=torch.float64)
    return x, targets, sample_weight


def test_newton_reaches_a_zero_gradient_quickly():
    for seed in range(3):
        x, targets, sample_weight = _problem(seed)
        result = fit_softmax_regression(x, targets, sample_weight, ridge=1e-3)
        assert result.converged and result.iterations <= 15
        weight = result.weight.clone().requires_grad_()
        loss = softmax_regression_loss(weight, x, targets, sample_weight, ridge=1e-3)
        (gradient,) = torch.autograd.grad(loss, weight)
        assert gradient.abs().max() < 1e-10


def test_a_tolerance_below_round_off_ends_without_a_long_line_search():
    x, targets, sample_weight = _problem(5)
    result = fit_softmax_regression(x, targets, sample_weight, tol=0.0, max_iter=12)
    # tol = 0 cannot be met; the iterations end at the optimum to round-off.
    assert not result.converged and result.grad_norm < 1e-13 and result.iterations <= 12


def test_an_overflowing_hessian_stops_the_newton_solve_unconverged():
    """Features at 1e200 overflow the Hessian: Cholesky refuses it and the least-squares
    fallback raised MKL's internal-assert ``RuntimeError`` (AVX-512 machine). Now the fallback
    gives a NaN direction, the line search finds no decrease, and the solve returns its
    (finite) starting weights, unconverged."""
    generator = torch.Generator().manual_seed(0)
    features = torch.cat(
        [
            torch.ones(50, 1, dtype=torch.float64),
            1e200 * torch.randn(50, 2, generator=generator, dtype=torch.float64),
        ],
        1,
    )
    labels = torch.randint(0, 3, (50,), generator=generator)
    targets = torch.nn.functional.one_hot(labels, 3).double()
    result = fit_softmax_regression(features, targets, max_iter=5)
    assert not result.converged
    assert torch.isfinite(result.weight).all()
