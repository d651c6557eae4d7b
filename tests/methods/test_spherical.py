"""slerp: reference test against a NumPy float64 reading of the formula, and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods.spherical import slerp


def reference(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    """Shoemake 1985 on flattened tensors, with MergeKit's lerp for |cos θ| > 0.9995."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.dot(a / na if na > 1e-8 else a, b / nb if nb > 1e-8 else b))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


@pytest.mark.parametrize("shape", [(1,), (5,), (7, 3), (2, 3, 4)])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_matches_float64_reference(shape: tuple[int, ...], t: float) -> None:
    rng = np.random.default_rng(len(shape) * 10 + int(t * 4))
    v0, v1 = rng.standard_normal(shape), rng.standard_normal(shape)
    ours = slerp(torch.from_numpy(v0), torch.from_numpy(v1), t).numpy()
    np.testing.assert_allclose(ours, reference(v0, v1, t), rtol=1e-10, atol=1e-12)


def test_quarter_circle_by_hand() -> None:
    # 90 degrees apart, t = 1/3: the result is 30 degrees from v0
    out = slerp(
        torch.tensor([2.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 2.0], dtype=torch.float64),
        1 / 3,
    )
    torch.testing.assert_close(
        out, torch.tensor([2 * np.cos(np.pi / 6), 2 * np.sin(np.pi / 6)], dtype=torch.float64)
    )


def test_nearly_colinear_inputs_are_lerped() -> None:
    v0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([2.0, 0.01, 0.0], dtype=torch.float64)  # cos θ ≈ 0.99999
    torch.testing.assert_close(slerp(v0, v1, 0.3), 0.7 * v0 + 0.3 * v1)


@settings(max_examples=50, deadline=None)
@given(t=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_identical_inputs_are_returned_bit_for_bit(t: float, seed: int) -> None:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((6, 5)).astype(np.float32))
    assert torch.equal(slerp(x, x.clone(), t), x)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_endpoints_are_the_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v0, v1 = (torch.from_numpy(rng.standard_normal(9)) for _ in range(2))
    torch.testing.assert_close(slerp(v0, v1, 0.0), v0)
    torch.testing.assert_close(slerp(v0, v1, 1.0), v1)
