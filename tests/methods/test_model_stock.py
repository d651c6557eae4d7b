"""Model Stock (Jang et al. 2024, arXiv:2403.19522) against an independent NumPy reading.

The reference follows the paper's ``t = k·cos φ / ((k − 1)·cos φ + 1)``,
``θ = t·θ̄_ft + (1 − t)·θ_0`` and MergeKit's choices for more than two models (the mean of the
pairwise cosines, each with the norm product floored at 1e-6 and clamped to [−1, 1]).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods.model_stock import model_stock, model_stock_ratio, run_model_stock
from alloykit.methods.registry import MethodInputs


def reference_ratio(base: np.ndarray, models: np.ndarray) -> float:
    """One t for the flattened vectors, from the formula (float64, plain loops)."""
    offsets = [(m - base).ravel() for m in models]
    cosines = []
    for a, b in itertools.combinations(offsets, 2):
        denominator = max(float(np.linalg.norm(a)) * float(np.linalg.norm(b)), 1e-6)
        cosines.append(min(max(float(a @ b) / denominator, -1.0), 1.0))
    cosine = sum(cosines) / len(cosines)
    k = len(offsets)
    denominator = (k - 1) * cosine + 1
    return k * cosine / denominator if denominator != 0 else math.nan


def reference(base: np.ndarray, models: np.ndarray, filter_wise: bool) -> np.ndarray:
    average = models.mean(axis=0)
    if not filter_wise or base.ndim < 2:
        t = reference_ratio(base, models)
        return t * average + (1 - t) * base
    rows_base = base.reshape(-1, base.shape[-1])
    rows_models = models.reshape(models.shape[0], -1, base.shape[-1])
    rows_average = average.reshape(-1, base.shape[-1])
    out = np.empty_like(rows_base)
    for r in range(rows_base.shape[0]):
        t = reference_ratio(rows_base[r], rows_models[:, r])
        out[r] = t * rows_average[r] + (1 - t) * rows_base[r]
    return out.reshape(base.shape)


def as_tensor(values: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(values).to(dtype)


SHAPES = [(1,), (7,), (5, 3), (4, 9), (2, 3, 5), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_matches_reference(shape: tuple[int, ...], k: int, filter_wise: bool) -> None:
    rng = np.random.default_rng(hash((shape, k, filter_wise)) % 2**32)
    base = rng.normal(size=shape)
    # a shared direction makes the cosines positive, as for real fine-tunes of one task
    shared = 3.0 + rng.normal(size=shape)
    models = base + shared + 0.7 * rng.normal(size=(k, *shape))
    got = model_stock(as_tensor(base), as_tensor(models), filter_wise=filter_wise)
    np.testing.assert_allclose(got.numpy(), reference(base, models, filter_wise), rtol=1e-10)


def test_golden_two_models_by_hand() -> None:
    # base = 0, δ_1 = (1, 0), δ_2 = (1, 1): cos φ = 1/√2; t = 2c/(1 + c) = 0.828427...
    # mean = (1, 0.5), so out = t·(1, 0.5)
    base = torch.zeros(2, dtype=torch.float64)
    models = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert t == pytest.approx(0.8284271247461902)
    np.testing.assert_allclose(model_stock(base, models).numpy(), [t, t / 2], rtol=1e-14)


def test_golden_filter_wise_by_hand() -> None:
    # row 0: δ = (1, 0), (0, 1): cos 0, t = 0 -> base row (1, 1)
    # row 1: δ = (2, 2), (1, 1): cos 1, t = 2/(1 + 1) = 1 -> the row average of (5, 5), (4, 4)
    base = torch.tensor([[1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    models = torch.tensor([[[2.0, 1.0], [5.0, 5.0]], [[1.0, 2.0], [4.0, 4.0]]], dtype=torch.float64)
    got = model_stock(base, models, filter_wise=True)
    np.testing.assert_allclose(got.numpy(), [[1.0, 1.0], [4.5, 4.5]], atol=1e-15)
    # one t for the whole tensor instead: δ_1 = (1, 0, 2, 2), δ_2 = (0, 1, 1, 1)
    # <δ_1, δ_2> = 4, ‖δ_1‖ = 3, ‖δ_2‖ = √3: cos = 4/(3√3)
    c = 4 / (3 * math.sqrt(3))
    t = 2 * c / (1 + c)
    expected = t * np.array([[1.5, 1.5], [4.5, 4.5]]) + (1 - t) * base.numpy()
    np.testing.assert_allclose(model_stock(base, models).numpy(), expected, rtol=1e-14)


def test_ratio_limits_from_the_paper() -> None:
    # papers.md §9.1.6: k = 2 with cos φ = 1 gives t = 1, cos φ = 0 gives t = 0
    base = torch.zeros(3, dtype=torch.float64)
    aligned = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], dtype=torch.float64)
    orthogonal = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert float(model_stock_ratio(base, aligned)[0]) == pytest.approx(1.0, abs=1e-15)
    assert float(model_stock_ratio(base, orthogonal)[0]) == 0.0


def test_opposite_offsets() -> None:
    # cos = -1 for two models: t = -2/(1 - 1) has no value (MergeKit does not clamp either)
    base = torch.zeros(1, dtype=torch.float64)
    opposite = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    assert not torch.isfinite(model_stock_ratio(base, opposite)).all()
    # three models, two opposite and one orthogonal: c = (-1 + 0 + 0)/3 = -1/3,
    # t = 3c/(1 + 2c) = -1/(1/3) = -3; mean = (0, 1/3), so out = -3·(0, 1/3) = (0, -1)
    base = torch.zeros(2, dtype=torch.float64)
    three = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(model_stock(base, three).numpy(), [0.0, -1.0], atol=1e-15)


def test_identical_models_and_zero_offsets_return_the_base() -> None:
    base = torch.tensor([0.5, -1.0, 2.0])
    # zero offsets: cos = 0/1e-6 = 0, t = 0
    assert torch.equal(model_stock(base, torch.stack([base, base, base])), base)
    models = torch.stack([base + 0.1, base + 0.1])
    # identical non-zero offsets: cos = 1, t = 1: their average
    torch.testing.assert_close(model_stock(base, models), base + 0.1)


def test_needs_two_models() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(torch.zeros(2), torch.ones(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_dtype_and_inputs(dtype: torch.dtype) -> None:
    base = torch.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4)
    models = torch.stack([base * 1.1, base + 0.2, base - 0.1])
    before = models.clone()
    out = model_stock(base, models, filter_wise=True)
    assert out.dtype == dtype and out.shape == base.shape
    assert torch.equal(models, before)


def test_adapter() -> None:
    base = torch.zeros(2, 3)
    models = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[1, 0, 0], [0, 0, 1]]])
    inputs = MethodInputs(models, base, {}, {"filter_wise": True})
    # row 0: both (1, 0, 0): t = 1; row 1: orthogonal: t = 0
    torch.testing.assert_close(run_model_stock(inputs), torch.tensor([[1.0, 0, 0], [0, 0, 0]]))


finite = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=2, max_value=4),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.booleans(),
)
def test_property_permutation_and_reference(k: int, n: int, seed: int, filter_wise: bool) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(2, n))
    models = base + rng.normal(size=(k, 2, n)) + rng.normal(size=(2, n))
    expected = reference(base, models, filter_wise)
    ratio_ok = np.isfinite(expected).all() and np.abs(expected).max() < 1e6
    if not ratio_ok:  # near cos = -1/(k-1) t blows up: nothing to compare
        return
    got = model_stock(as_tensor(base), as_tensor(models), filter_wise=filter_wise).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-9)
    permuted = model_stock(as_tensor(base), as_tensor(models[::-1].copy()), filter_wise=filter_wise)
    np.testing.assert_allclose(permuted.numpy(), got, rtol=1e-8, atol=1e-9)
