"""expo: reference test against a NumPy float64 reading of the ExPO formula, and properties.

Zheng et al. 2024, "Weak-to-Strong Extrapolation Expedites Alignment", arXiv:2404.16792:
θ_expo = θ_aligned + α·(θ_aligned − θ_sft).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods import METHODS
from alloykit.methods.extrapolate import extrapolate, run_expo
from alloykit.methods.registry import MethodInputs


def reference(base: np.ndarray, tuned: np.ndarray, alpha: float) -> np.ndarray:
    """The paper's update θ_2 = θ_1 + α·Δθ with Δθ = θ_1 − θ_0, written as (1+α)θ_1 − αθ_0."""
    return (1.0 + alpha) * tuned - alpha * base


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 3), (33, 17), (2, 3, 4)])
@pytest.mark.parametrize("alpha", [0.1, 0.3, 1.0, -0.5, 2.5])
def test_matches_float64_reference(shape: tuple[int, ...], alpha: float) -> None:
    rng = np.random.default_rng(sum(shape) + int(abs(alpha) * 10))
    base, tuned = rng.standard_normal(shape), rng.standard_normal(shape)
    out = extrapolate(torch.from_numpy(base), torch.from_numpy(tuned), alpha)
    np.testing.assert_allclose(out.numpy(), reference(base, tuned, alpha), rtol=1e-12, atol=1e-12)


def test_golden_case() -> None:
    # base [1, 2, -1], tuned [2, 2, 1], α = 0.5: Δ = [1, 0, 2]; tuned + 0.5Δ = [2.5, 2, 2]
    out = extrapolate(torch.tensor([1.0, 2.0, -1.0]), torch.tensor([2.0, 2.0, 1.0]), 0.5)
    assert out.tolist() == [2.5, 2.0, 2.0]


def test_float32_is_within_rounding_and_keeps_dtype() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((64, 31)).astype(np.float32)
    tuned = base + 1e-3 * rng.standard_normal((64, 31)).astype(np.float32)
    out = extrapolate(torch.from_numpy(base), torch.from_numpy(tuned), 0.1)
    assert out.dtype == torch.float32
    expected = reference(base.astype(np.float64), tuned.astype(np.float64), 0.1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.floats(-2.0, 5.0))
def test_identical_models_are_returned_bit_for_bit(seed: int, alpha: float) -> None:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((6, 5)).astype(np.float32))
    assert torch.equal(extrapolate(x, x.clone(), alpha), x)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.floats(-2.0, 5.0))
def test_alpha_zero_gives_the_tune_and_minus_one_the_base(seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    base, tuned = (torch.from_numpy(rng.standard_normal(9)) for _ in range(2))
    assert torch.equal(extrapolate(base, tuned, 0.0), tuned)
    torch.testing.assert_close(extrapolate(base, tuned, -1.0), base, rtol=1e-12, atol=1e-12)
    # the result lies on the line through base and tuned, at (1 + α) along it
    torch.testing.assert_close(
        extrapolate(base, tuned, alpha) - base, (1 + alpha) * (tuned - base), rtol=1e-9, atol=1e-9
    )


def test_inputs_are_not_modified() -> None:
    base, tuned = torch.randn(4, 4), torch.randn(4, 4)
    base_copy, tuned_copy = base.clone(), tuned.clone()
    extrapolate(base, tuned, 0.3)
    assert torch.equal(base, base_copy) and torch.equal(tuned, tuned_copy)


def _inputs(tensors: torch.Tensor, base: torch.Tensor, alpha: float) -> MethodInputs:
    return MethodInputs(tensors=tensors, base=base, per_model={}, params={"alpha": alpha})


def test_adapter_and_registry_row() -> None:
    base, tuned = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    out = run_expo(_inputs(tuned.unsqueeze(0), base, 0.2))
    np.testing.assert_allclose(out.numpy(), reference(base.numpy(), tuned.numpy(), 0.2))
    with pytest.raises(ValueError, match="exactly one model"):
        run_expo(_inputs(torch.stack([tuned, tuned]), base, 0.2))
    row = METHODS["expo"]
    assert (row.min_models, row.max_models, row.base) == (1, 1, "required")
    alpha = row.param("alpha")
    assert alpha is not None and alpha.default == 0.1
