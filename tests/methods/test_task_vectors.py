"""task_arithmetic and its combine step: reference tests and properties."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods.task_vectors import combine, task_arithmetic


def reference(
    base: np.ndarray, tensors: np.ndarray, weights: np.ndarray, normalize: bool, lam: float
) -> np.ndarray:
    """Ilharco et al. 2023 with MergeKit's normalisation: base + λ Σ w_i (x_i − base) [/ Σ w_i]."""
    combined = np.tensordot(weights, tensors - base, axes=1)
    if normalize and abs(weights.sum()) >= 1e-8:
        combined = combined / weights.sum()
    return base + lam * combined


def test_matches_float64_reference() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((9, 4))
    tensors = base + 0.1 * rng.standard_normal((3, 9, 4))
    weights = np.array([1.0, -0.5, 0.7])
    for normalize in (False, True):
        for lam in (1.0, 0.3):
            ours = task_arithmetic(
                torch.from_numpy(base),
                torch.from_numpy(tensors),
                torch.from_numpy(weights),
                normalize=normalize,
                scale=lam,
            )
            np.testing.assert_allclose(
                ours.numpy(),
                reference(base, tensors, weights, normalize, lam),
                rtol=1e-12,
                atol=1e-13,
            )


def test_negative_weight_negates_the_task_vector() -> None:
    base = torch.zeros(3, dtype=torch.float64)
    tuned = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    out = task_arithmetic(base, tuned, torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(out, -tuned[0])


def test_weights_summing_to_zero_are_not_divided() -> None:
    deltas = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, -1.0], dtype=torch.float64)
    weighted = deltas * weights[:, None]
    out = combine(weighted, None, weights, method="sum", normalize=True)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(-3, 3), min_size=1, max_size=4),
    normalize=st.booleans(),
    lam=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_fine_tunes_equal_to_the_base_return_the_base_bit_for_bit(
    weights: list[float], normalize: bool, lam: float, seed: int
) -> None:
    base = torch.from_numpy(np.random.default_rng(seed).standard_normal((5, 6)).astype(np.float32))
    tensors = base.expand(len(weights), 5, 6).clone()
    out = task_arithmetic(
        base, tensors, torch.tensor(weights, dtype=torch.float64), normalize=normalize, scale=lam
    )
    assert torch.equal(out, base)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.1, 3), min_size=2, max_size=4), seed=st.integers(0, 999))
def test_normalized_merge_of_one_repeated_fine_tune_is_that_fine_tune(
    weights: list[float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.standard_normal(8))
    tuned = base + torch.from_numpy(rng.standard_normal(8))
    tensors = tuned.expand(len(weights), 8).clone()
    out = task_arithmetic(base, tensors, torch.tensor(weights, dtype=torch.float64), normalize=True)
    torch.testing.assert_close(out, tuned)
