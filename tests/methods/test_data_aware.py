"""RegMean, Fisher merging and AIM kernels against NumPy float64 readings of their papers."""

from __future__ import annotations

import numpy as np
import torch

from alloykit.methods import METHODS, MethodInputs
from alloykit.methods.data_aware import aim, fisher_merge, regmean


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_regmean_with_alpha_one_is_the_least_squares_merge() -> None:
    # min_W Σ_i ‖X_i W − X_i W_i‖², solved by lstsq on the stacked system (Jin et al. 2023 eq. 2)
    rng = _rng(1)
    d, out = 5, 3
    xs = [rng.standard_normal((n, d)) for n in (7, 9, 6)]
    ws = [rng.standard_normal((d, out)) for _ in xs]  # the paper's W_i: y = x W_i
    expected, *_ = np.linalg.lstsq(
        np.vstack(xs), np.vstack([x @ w for x, w in zip(xs, ws, strict=True)])
    )
    grams = torch.tensor(np.stack([x.T @ x for x in xs]))
    # nn.Linear stores W_iᵀ (out, in): input channels on axis 1
    linear = torch.tensor(np.stack([w.T for w in ws]))
    got = regmean(linear, grams, alpha=1.0, input_axis=1)
    np.testing.assert_allclose(got.numpy(), expected.T, rtol=1e-10, atol=1e-10)
    # GPT-2's Conv1D stores W_i itself (in, out): input channels on axis 0
    conv = torch.tensor(np.stack(ws))
    np.testing.assert_allclose(regmean(conv, grams, 1.0, 0).numpy(), expected, atol=1e-10)


def test_regmean_shrinks_off_diagonals_by_alpha() -> None:
    rng = _rng(2)
    d, out, alpha = 4, 6, 0.7
    xs = [rng.standard_normal((8, d)) for _ in range(2)]
    ws = [rng.standard_normal((d, out)) for _ in xs]
    shrunk = [alpha * x.T @ x + (1 - alpha) * np.diag(np.diag(x.T @ x)) for x in xs]
    expected = np.linalg.solve(sum(shrunk), sum(g @ w for g, w in zip(shrunk, ws, strict=True)))
    got = regmean(
        torch.tensor(np.stack([w.T for w in ws])),
        torch.tensor(np.stack([x.T @ x for x in xs])),
        alpha,
        1,
    )
    np.testing.assert_allclose(got.numpy(), expected.T, atol=1e-10)


def test_regmean_equal_grams_give_the_mean_and_a_zero_input_drops_out() -> None:
    rng = _rng(3)
    x = rng.standard_normal((10, 4))
    weights = torch.tensor(rng.standard_normal((3, 2, 4)))
    gram = torch.tensor(x.T @ x)
    equal = regmean(weights, gram.expand(3, 4, 4), 0.5, 1)
    torch.testing.assert_close(equal, weights.mean(0))
    # model 3 saw only zeros: it has no say, the rest are averaged (papers.md §9.1, 10)
    grams = torch.stack([gram, gram, torch.zeros(4, 4, dtype=torch.float64)])
    torch.testing.assert_close(regmean(weights, grams, 0.9, 1), weights[:2].mean(0))


def test_regmean_without_grams_averages() -> None:
    tensors = torch.randn(3, 7, dtype=torch.float64)
    inputs = MethodInputs(tensors, None, {}, {"alpha": 0.9})
    torch.testing.assert_close(METHODS["regmean"].run(inputs), tensors.mean(0))


def test_fisher_with_identical_fishers_is_the_plain_average() -> None:
    tensors = torch.randn(3, 4, 5, dtype=torch.float64)
    fisher = torch.rand(4, 5, dtype=torch.float64).expand(3, 4, 5)
    got = fisher_merge(tensors, fisher, torch.ones(3, dtype=torch.float64), 1e-6)
    torch.testing.assert_close(got, tensors.mean(0))


def test_fisher_matches_the_weighted_formula() -> None:
    rng = _rng(4)
    thetas = rng.standard_normal((3, 6))
    fishers = rng.random((3, 6)) ** 3
    fishers[:, 0] = 0.0  # no model's data reached this parameter: epsilon gives the mean
    c, eps = np.array([0.5, 0.3, 0.2]), 1e-6
    mass = c[:, None] * (fishers + eps)
    expected = (mass * thetas).sum(0) / mass.sum(0)
    inputs = MethodInputs(
        torch.tensor(thetas),
        None,
        {"weight": torch.tensor(c)},
        {"epsilon": eps},
        statistics=torch.tensor(fishers),
    )
    got = METHODS["fisher"].run(inputs)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(got[0].item(), (c * thetas[:, 0]).sum() / c.sum(), atol=1e-12)


def test_aim_with_zero_strength_returns_the_merge() -> None:
    merged, base = torch.randn(2, 3, 5), torch.randn(3, 5)
    activation = torch.rand(5)
    assert torch.equal(aim(merged[0], base, activation, 0.0, 1), merged[0])


def test_aim_matches_the_relaxation_formula() -> None:
    rng = _rng(5)
    merged, base = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    activation, strength = rng.random(5), 0.6
    relax = 1 - strength * activation / activation.max()  # r_j = 1 − (1 − ω)·â_j
    expected = base + (merged - base) * relax[None, :]  # broadcast over input columns
    got = aim(torch.tensor(merged), torch.tensor(base), torch.tensor(activation), strength, 1)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    conv = aim(torch.tensor(merged.T), torch.tensor(base.T), torch.tensor(activation), strength, 0)
    np.testing.assert_allclose(conv.numpy(), expected.T, atol=1e-12)
