"""SCE (Wan et al. 2024, FuseChat, arXiv:2408.07990) against an independent NumPy reading.

Select: the top ``τ`` of the positions with nonzero variance over the models (population
variance); Calculate: ``s_i = mean(δ_i²) / Σ_j mean(δ_j²)`` (uniform under 1e-6); Erase: keep
the entries whose sign is the sign of ``Σ_j δ_j`` (zero total: +); then
``out = base + Σ s_i·m_i·δ_i / max(Σ s_i·m_i, 1e-6)`` (MergeKit's ``sce``, reference §1.10).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods.registry import MethodInputs
from alloykit.methods.sce import run_sce, sce, size_weights, variance_mask


def reference(base: np.ndarray, models: np.ndarray, select_topk: float) -> np.ndarray:
    deltas = models - base
    k = deltas.shape[0]
    if select_topk < 1:
        variance = deltas.var(axis=0)
        # the variance is zero exactly where every model agrees (np.var may leave a rounding)
        variance[np.ptp(deltas, axis=0) == 0] = 0.0
        flat = variance.ravel()
        keep = int(np.count_nonzero(flat) * select_topk)
        # largest variance first, ties to the lower flat index
        order = np.lexsort((np.arange(flat.size), -flat))
        mask = np.zeros(flat.size, dtype=bool)
        mask[order[:keep]] = True
        deltas = deltas * mask.reshape(variance.shape)
    mean_squares = np.array([np.mean(d**2) for d in deltas])
    total = mean_squares.sum()
    weights = np.full(k, 1.0 / k) if abs(total) < 1e-6 else mean_squares / total
    elected = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == elected
    numerator = np.zeros(base.shape)
    denominator = np.zeros(base.shape)
    for i in range(k):
        numerator += weights[i] * agree[i] * deltas[i]
        denominator += weights[i] * agree[i]
    return base + numerator / np.maximum(denominator, 1e-6)


def as_tensor(values: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(dtype)


SHAPES = [(1,), (6,), (5, 3), (4, 9), (2, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.3, 0.0])
def test_matches_reference(shape: tuple[int, ...], k: int, select_topk: float) -> None:
    rng = np.random.default_rng(hash((shape, k, select_topk)) % 2**32)
    base = rng.normal(size=shape)
    models = base + rng.normal(size=(k, *shape))
    got = sce(as_tensor(base), as_tensor(models), select_topk=select_topk)
    np.testing.assert_allclose(got.numpy(), reference(base, models, select_topk), rtol=1e-12)


# Hand-worked case: base = 0.5 everywhere, δ_1 = (1, 0, 2, -1), δ_2 = (1, 2, -2, -1),
# δ_3 = (1, -2, 1, -1).
HAND_DELTAS = [[1.0, 0.0, 2.0, -1.0], [1.0, 2.0, -2.0, -1.0], [1.0, -2.0, 1.0, -1.0]]


def test_golden_select_half_by_hand() -> None:
    # Var over models per position: 0; (0, 2, -2) -> 8/3; (2, -2, 1) -> mean 1/3,
    # ((5/3)² + (7/3)² + (2/3)²)/3 = 26/9; 0. Two nonzero, keep int(2·0.5) = 1: position 2.
    # Masked δ: (0,0,2,0), (0,0,-2,0), (0,0,1,0); mean squares 1, 1, 1/4 -> s = 4/9, 4/9, 1/9.
    # Position 2: Σ δ = 1 -> +; δ_1 and δ_3 agree: (4/9·2 + 1/9·1) / (4/9 + 1/9) = 1 / (5/9) = 1.8.
    # Elsewhere every δ is 0, which never agrees: Σ = 0, divisor max(0, 1e-6): + 0.
    base = torch.full((4,), 0.5, dtype=torch.float64)
    models = base + torch.tensor(HAND_DELTAS, dtype=torch.float64)
    got = sce(base, models, select_topk=0.5)
    np.testing.assert_allclose(got.numpy(), [0.5, 0.5, 2.3, 0.5], rtol=1e-14)
    assert variance_mask(models - base, 0.5).tolist() == [False, False, True, False]


def test_golden_no_selection_by_hand() -> None:
    # Mean squares: (1+0+4+1)/4 = 1.5, (1+4+4+1)/4 = 2.5, (1+4+1+1)/4 = 1.75; total 5.75
    # -> s = 6/23, 10/23, 7/23.
    # pos 0: all +1: 1.  pos 1: Σ = 0 -> +, only δ_2 = 2 agrees: 2.
    # pos 2: Σ = 1 -> +, δ_1 = 2 and δ_3 = 1: (12/23 + 7/23) / (13/23) = 19/13.  pos 3: -1.
    base = torch.full((4,), 0.5, dtype=torch.float64)
    models = base + torch.tensor(HAND_DELTAS, dtype=torch.float64)
    np.testing.assert_allclose(
        size_weights(models - base).numpy(), [6 / 23, 10 / 23, 7 / 23], rtol=1e-14
    )
    got = sce(base, models)
    np.testing.assert_allclose(got.numpy(), [1.5, 2.5, 0.5 + 19 / 13, -0.5], rtol=1e-14)


def test_tiny_task_vectors_weigh_equally() -> None:
    # mean squares 5e-9 and 4.5e-8 sum below 1e-6: s = (1/2, 1/2), not (0.1, 0.9)
    base = torch.zeros(2, dtype=torch.float64)
    models = torch.tensor([[1e-4, 0.0], [3e-4, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(sce(base, models).numpy(), [2e-4, 0.0], rtol=1e-12)


def test_opposite_signs_zero_total_elects_plus() -> None:
    base = torch.zeros(1, dtype=torch.float64)
    models = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    assert sce(base, models).tolist() == [1.0]


def test_identical_models_and_zero_deltas() -> None:
    base = torch.tensor([0.1, -0.2, 0.3])
    assert torch.equal(sce(base, torch.stack([base, base])), base)
    shifted = torch.stack([base + 0.5, base + 0.5])
    # without selection the common delta is kept; with it nothing varies, nothing is selected
    torch.testing.assert_close(sce(base, shifted), base + 0.5)
    assert torch.equal(sce(base, shifted, select_topk=0.5), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_inputs_untouched(dtype: torch.dtype) -> None:
    base = torch.linspace(-1, 1, 10, dtype=dtype)
    models = torch.stack([base * 1.5, base - 0.3, base.flip(0)])
    before = models.clone()
    out = sce(base, models, select_topk=0.4)
    assert out.dtype == dtype and out.shape == base.shape
    assert torch.equal(models, before)


def test_adapter_ignores_int8_mask() -> None:
    base = torch.zeros(4, dtype=torch.float64)
    models = torch.tensor(HAND_DELTAS, dtype=torch.float64)
    inputs = MethodInputs(models.clone(), base, {}, {"select_topk": 0.5, "int8_mask": True})
    torch.testing.assert_close(run_sce(inputs), sce(base, models, select_topk=0.5))


@settings(max_examples=80, deadline=None)
@given(
    st.integers(min_value=1, max_value=4),
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=2),
    st.floats(min_value=0.0, max_value=1.0),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_reference_and_permutation(
    k: int, shape: list[int], select_topk: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    # some entries unchanged (zero deltas, which never agree); continuous values otherwise, so
    # variances tie only where they are exactly zero, in both readings
    changed = rng.random(size=(k, *shape)) < 0.7
    models = base + rng.normal(size=(k, *shape)) * changed
    got = sce(as_tensor(base), as_tensor(models), select_topk=select_topk).numpy()
    np.testing.assert_allclose(got, reference(base, models, select_topk), rtol=1e-10, atol=1e-12)
    permutation = rng.permutation(k)
    permuted = sce(as_tensor(base), as_tensor(models[permutation]), select_topk=select_topk)
    np.testing.assert_allclose(permuted.numpy(), got, rtol=1e-10, atol=1e-12)
