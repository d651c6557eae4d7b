"""linear: reference test against a NumPy float64 reading of the formula, and properties."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods.linear import linear


def reference(tensors: np.ndarray, weights: np.ndarray, normalize: bool) -> np.ndarray:
    """Wortsman et al. 2022: out = Σ w_i x_i / Σ w_i (no division without normalize)."""
    total = np.tensordot(weights, tensors, axes=1)
    return total / weights.sum() if normalize else total


def test_matches_float64_reference() -> None:
    rng = np.random.default_rng(0)
    tensors = rng.standard_normal((3, 17, 5))
    weights = np.array([1.0, 0.5, -0.25])
    for normalize in (True, False):
        ours = linear(torch.from_numpy(tensors), torch.from_numpy(weights), normalize=normalize)
        np.testing.assert_allclose(
            ours.numpy(), reference(tensors, weights, normalize), rtol=1e-12, atol=1e-12
        )


def test_float32_is_within_float32_rounding_of_the_reference() -> None:
    rng = np.random.default_rng(1)
    tensors = rng.standard_normal((4, 64, 32)).astype(np.float32)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    ours = linear(torch.from_numpy(tensors), torch.from_numpy(weights), normalize=True)
    expected = reference(tensors.astype(np.float64), weights, True)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 5),
    weights=st.lists(st.floats(0.01, 10.0), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_identical_inputs_are_returned_bit_for_bit(k: int, weights: list[float], seed: int) -> None:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((7, 3)).astype(np.float32))
    out = linear(x.expand(k, 7, 3).clone(), torch.tensor(weights[:k], dtype=torch.float64))
    assert torch.equal(out, x)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0.05, 5.0), min_size=2, max_size=5),
    constant=st.floats(-100, 100),
)
def test_normalized_weights_preserve_a_constant_tensor(
    weights: list[float], constant: float
) -> None:
    x = torch.full((len(weights), 4, 4), constant, dtype=torch.float64)
    out = linear(x, torch.tensor(weights, dtype=torch.float64))
    torch.testing.assert_close(out, x[0])


def test_result_does_not_depend_on_thread_count() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((3, 300, 257)).astype(np.float32))
    w = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, w)
        torch.set_num_threads(max(2, before))
        many = linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
