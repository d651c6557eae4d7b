"""nearswap and arcee_fusion against an independent NumPy reading of MergeKit's definitions.

* nearswap (QuartetAnemoi-70B-t0.0001 model card; reference §1.12):
  ``w = clamp(t / max(|base − x|, 1e-6), 0, 1)``, ``out = w·x + (1 − w)·base``.
* arcee_fusion (Arcee AI; reference §1.13): ``I = |x − base|·KL(softmax(x)+1e-8 ‖
  softmax(base)+1e-8)`` per row of the last dimension; keep ``x − base`` where
  ``I ≥ median + 1.5·(q3 − q1)``, quantile ``q`` being sorted element ``⌊q·(n − 1)⌋``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods.fusion import (
    QUANTILE_SAMPLE,
    arcee_fusion,
    fusion_importance,
    fusion_threshold,
    nearswap,
    run_arcee_fusion,
    run_nearswap,
)
from alloykit.methods.registry import MethodInputs


def reference_nearswap(base: np.ndarray, other: np.ndarray, t: float) -> np.ndarray:
    weight = np.clip(t / np.maximum(np.abs(base - other), 1e-6), 0.0, 1.0)
    return weight * other + (1 - weight) * base


def softmax_rows(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def reference_importance(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    p = softmax_rows(np.atleast_1d(other)) + 1e-8
    q = softmax_rows(np.atleast_1d(base)) + 1e-8
    divergence = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    return (np.abs(np.atleast_1d(other) - np.atleast_1d(base)) * divergence).reshape(base.shape)


def reference_threshold(importance: np.ndarray) -> float:
    ordered = np.sort(importance.ravel())
    n = ordered.size
    q1, median, q3 = (ordered[math.floor(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return float(median + 1.5 * (q3 - q1))


def reference_fusion(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    importance = reference_importance(base, other)
    keep = importance >= reference_threshold(importance)
    return base + (other - base) * keep


def as_tensor(values: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(dtype)


SHAPES = [(1,), (7,), (5, 3), (4, 9), (2, 3, 5), (1, 1)]


# ---------------------------------------------------------------------------- nearswap


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [1e-4, 0.05, 0.5, 10.0])
def test_nearswap_matches_reference(shape: tuple[int, ...], t: float) -> None:
    rng = np.random.default_rng(hash((shape, t)) % 2**32)
    base = rng.normal(size=shape)
    other = base + rng.normal(scale=0.2, size=shape)
    got = nearswap(as_tensor(base), as_tensor(other), t)
    np.testing.assert_allclose(got.numpy(), reference_nearswap(base, other, t), rtol=1e-14)


def test_nearswap_golden_by_hand() -> None:
    # t = 0.1: |δ| = 0.05 -> w = 2 -> 1 (take x); 0.2 -> w = 0.5 -> 0.1; 0.4 -> w = 0.25 -> -0.1;
    # δ = 0 -> w = 0.1/1e-6 -> 1, and x = base there anyway.
    base = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    other = torch.tensor([0.05, 0.2, -0.4, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(nearswap(base, other, 0.1).numpy(), [0.05, 0.1, -0.1, 1.0])


def test_nearswap_edges() -> None:
    base = torch.tensor([1.0, -2.0, 3.0])
    other = torch.tensor([1.5, -2.0, 0.0])
    assert torch.equal(nearswap(base, base.clone(), 0.3), base)  # identical models
    assert torch.equal(nearswap(base, other, 0.0), base)  # t = 0: the base
    assert torch.equal(nearswap(base, other, 1e9), other)  # t huge: the other model
    # MergeKit's floor: a difference below 1e-6 counts as 1e-6, so t = 5e-7 gives w = 1/2
    tiny = torch.tensor([1e-8], dtype=torch.float64)
    np.testing.assert_allclose(nearswap(torch.zeros(1, dtype=torch.float64), tiny, 5e-7), [5e-9])


# ---------------------------------------------------------------------------- arcee_fusion


def test_importance_golden_by_hand() -> None:
    # row 0: p = softmax(1, -1) = (e/(e + 1/e), ...) = (0.880797, 0.119203), q = (1/2, 1/2):
    #   KL = 0.880797·ln(1.761594) + 0.119203·ln(0.238406) = 0.498724 − 0.170911 = 0.327813
    #   (the 1e-8 floors change it by ~1e-8); |δ| = 1, 1 -> importance 0.327813 on both entries
    # row 1: softmax(0.5, 0.5) = q: KL = 0 -> importance 0
    base = torch.zeros(2, 2, dtype=torch.float64)
    other = torch.tensor([[1.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    got = fusion_importance(base, other)
    np.testing.assert_allclose(got.numpy(), [[0.327813, 0.327813], [0, 0]], atol=1e-6)


def test_arcee_fusion_golden_by_hand() -> None:
    # 1-D: one KL value K > 0 for the whole tensor, so I = K·|δ|. Sorted |δ|: 0.1 ... 0.7, 3.0;
    # n = 8: q1 = element ⌊1.75⌋ = 1 (0.2), median ⌊3.5⌋ = 3 (0.4), q3 ⌊5.25⌋ = 5 (0.6);
    # threshold = K·(0.4 + 1.5·0.4) = K·1.0: only δ = 3.0 passes.
    base = torch.full((8,), 0.25, dtype=torch.float64)
    other = base + torch.tensor([0.3, 0.1, 0.7, 3.0, 0.5, 0.2, 0.6, 0.4], dtype=torch.float64)
    expected = base + torch.tensor([0, 0, 0, 3.0, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(arcee_fusion(base, other), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_matches_reference(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(hash(shape) % 2**32)
    base = rng.normal(size=shape)
    other = base + rng.normal(scale=0.3, size=shape)
    importance = fusion_importance(as_tensor(base), as_tensor(other))
    np.testing.assert_allclose(importance.numpy(), reference_importance(base, other), rtol=1e-9)
    got = arcee_fusion(as_tensor(base), as_tensor(other))
    np.testing.assert_allclose(got.numpy(), reference_fusion(base, other), rtol=1e-14)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 100, 1001])
def test_threshold_matches_sorted_quantiles(n: int) -> None:
    values = np.random.default_rng(n).exponential(size=n)
    got = float(fusion_threshold(as_tensor(values)))
    assert got == pytest.approx(reference_threshold(values), rel=1e-15)


def test_arcee_fusion_edges() -> None:
    base = torch.tensor([[0.1, -0.3, 0.2], [1.0, 2.0, 3.0]])
    assert torch.equal(arcee_fusion(base, base.clone()), base)  # identical: I = 0 ≥ 0 -> base
    constant = torch.full((2, 3), 0.7)
    assert torch.equal(arcee_fusion(constant, constant.clone()), constant)
    # one element: threshold = its own importance, so it is kept
    one = torch.tensor([0.4])
    assert torch.equal(arcee_fusion(torch.tensor([0.1]), one), one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_inputs_untouched(dtype: torch.dtype) -> None:
    base = torch.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4)
    other = base.flip(1)
    before = other.clone()
    for out in (arcee_fusion(base, other), nearswap(base, other, 0.1)):
        assert out.dtype == dtype and out.shape == base.shape
    assert torch.equal(other, before)


def test_large_tensors_sample_with_the_generator() -> None:
    # above 1,000,000 elements the quantiles come from a seeded sample
    rows, columns = 1001, 1000
    assert rows * columns > QUANTILE_SAMPLE
    source = torch.Generator().manual_seed(0)
    base = torch.randn(rows, columns, generator=source)
    other = base + 0.1 * torch.randn(rows, columns, generator=source)
    first = arcee_fusion(base, other, torch.Generator().manual_seed(7))
    again = arcee_fusion(base, other, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    importance = fusion_importance(base, other)
    exact = reference_threshold(importance.numpy())
    sampled = float(fusion_threshold(importance, torch.Generator().manual_seed(7)))
    assert sampled == pytest.approx(exact, rel=0.01)  # a 1e6 sample of 1.001e6 values
    assert sampled != exact  # it did sample: with replacement, a few values repeat or miss


def test_adapters() -> None:
    base = torch.zeros(1, 4, dtype=torch.float64)
    other = torch.tensor([[[0.05, 0.2, -0.4, 0.0]]], dtype=torch.float64)
    inputs = MethodInputs(other, base, {}, {"t": 0.1})
    torch.testing.assert_close(run_nearswap(inputs), nearswap(base, other[0], 0.1))
    inputs = MethodInputs(other, base, {}, {}, torch.Generator().manual_seed(1))
    torch.testing.assert_close(run_arcee_fusion(inputs), arcee_fusion(base, other[0]))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=3),
    st.floats(min_value=0.0, max_value=2.0),
    st.floats(min_value=0.01, max_value=3.0),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_reference(shape: list[int], t: float, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    other = base + rng.normal(scale=scale, size=shape)
    np.testing.assert_allclose(
        nearswap(as_tensor(base), as_tensor(other), t).numpy(),
        reference_nearswap(base, other, t),
        rtol=1e-13,
        atol=1e-15,
    )
    got = arcee_fusion(as_tensor(base), as_tensor(other)).numpy()
    np.testing.assert_allclose(got, reference_fusion(base, other), rtol=1e-13, atol=1e-15)
    # float32 inputs keep the same elements as float64 ones (the importance is float64 either
    # way) unless one sits within float32 rounding of the threshold
    importance = reference_importance(base, other)
    threshold = reference_threshold(importance)
    if np.all(np.abs(importance - threshold) > 1e-2 * max(threshold, 1e-12)):
        single = arcee_fusion(as_tensor(base, torch.float32), as_tensor(other, torch.float32))
        kept = single.numpy() != as_tensor(base, torch.float32).numpy()
        assert np.array_equal(kept | (other == base), (importance >= threshold) | (other == base))
