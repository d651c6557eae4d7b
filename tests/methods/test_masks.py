"""magmax and consensus (TALL masks): float64 NumPy references written from the papers.

* MagMax (Marczak et al. 2024, ECCV, arXiv:2407.06322): τ_MagMax^p = τ_k^p with
  k = argmax_i |τ_i^p|; θ = θ0 + λ·τ_MagMax.
* TALL masks / Consensus merging (Wang et al. 2024, ICML, arXiv:2405.07813):
  m_t = 1{|θ0 − θ_t| ≥ λ_t·|θ_MTL − θ_t|}, θ_MTL = θ0 + Σ_t τ_t;
  m_consensus = 1{Σ_t m_t ≥ k}; θ = θ0 + α·m_consensus ⊙ Σ_t τ_t.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods import METHODS
from alloykit.methods.masks import consensus, magmax, run_consensus, run_magmax, tall_masks
from alloykit.methods.registry import MethodInputs

SHAPES = [(1,), (9,), (4, 7), (31, 5), (2, 3, 5)]


def ref_magmax(base: np.ndarray, tuned: np.ndarray, scale: float) -> np.ndarray:
    """Largest |τ| per entry; among equal magnitudes the larger value (order-free)."""
    deltas = tuned - base
    largest = np.abs(deltas).max(axis=0)
    candidates = np.where(np.abs(deltas) == largest, deltas, -np.inf)
    return base + scale * candidates.max(axis=0)


def ref_consensus(
    base: np.ndarray,
    tuned: np.ndarray,
    weights: np.ndarray,
    lambdas: np.ndarray,
    k: int,
    scale: float,
) -> np.ndarray:
    """The paper's construction written on weights: θ_t, θ_MTL = θ0 + Σ w_t τ_t."""
    n = tuned.shape[0]
    scaled = [weights[t] * (tuned[t] - base) for t in range(n)]
    theta_t = [base + scaled[t] for t in range(n)]  # the (weighted) single-task models
    theta_mtl = base + sum(scaled)
    votes = np.zeros(base.shape, dtype=int)
    for t in range(n):
        votes += np.abs(base - theta_t[t]) >= lambdas[t] * np.abs(theta_mtl - theta_t[t])
    return base + scale * np.where(votes >= k, theta_mtl - base, 0.0)


def _random(shape: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    return base, base + rng.standard_normal((n, *shape))


# ----------------------------------------------------------------------------- magmax


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_magmax_matches_float64_reference(shape: tuple[int, ...], n: int) -> None:
    base, tuned = _random(shape, n, seed=n * 100 + sum(shape))
    for scale in (0.5, 1.0, -0.3):
        out = magmax(torch.from_numpy(base), torch.from_numpy(tuned), scale)
        np.testing.assert_allclose(
            out.numpy(), ref_magmax(base, tuned, scale), rtol=1e-12, atol=1e-12
        )


def test_magmax_golden_case() -> None:
    # base [1, 0, 0, 0]; τ_1 = [1, -3, 2, 0.5], τ_2 = [-2, 1, -2, 0]
    # per entry: |1|<|-2| -> -2; |-3|>|1| -> -3; |2|=|-2| tie -> larger value 2; 0.5
    # out = base + 0.5·[-2, -3, 2, 0.5] = [1 - 1, -1.5, 1, 0.25]
    base = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    tuned = base + torch.tensor([[1.0, -3.0, 2.0, 0.5], [-2.0, 1.0, -2.0, 0.0]])
    assert magmax(base, tuned, 0.5).tolist() == [0.0, -1.5, 1.0, 0.25]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), scale=st.floats(-2, 2))
def test_magmax_properties(seed: int, n: int, scale: float) -> None:
    base, tuned = _random((6, 3), n, seed)
    # round to a coarse grid so that equal magnitudes (ties) really occur
    tuned = base + np.round(tuned - base, 0)
    b, x = torch.from_numpy(base), torch.from_numpy(tuned)
    out = magmax(b, x, 1.0)
    selected = (out - b).numpy()
    deltas = tuned - base
    # the selection is one of the task vectors' entries, of the largest magnitude
    assert np.all(np.any(deltas == selected, axis=0))
    assert np.all(np.abs(selected) >= np.abs(deltas).max(axis=0))
    # permuting the models changes nothing, bit for bit
    permutation = np.random.default_rng(seed).permutation(n)
    assert torch.equal(magmax(b, x[permutation], scale), magmax(b, x, scale))
    # identical models: the base plus λ times their shared task vector
    same = x[:1].expand(n, *x.shape[1:]).clone()
    torch.testing.assert_close(magmax(b, same, scale), b + scale * (x[0] - b))


def test_magmax_zero_task_vectors_and_float32() -> None:
    base = torch.randn(5, 4)
    assert torch.equal(magmax(base, base.expand(3, 5, 4).clone(), 0.5), base)
    base64, tuned64 = _random((40, 17), 3, seed=7)
    out = magmax(
        torch.from_numpy(base64.astype(np.float32)), torch.from_numpy(tuned64.astype(np.float32))
    )
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref_magmax(base64, tuned64, 0.5), atol=1e-5)


# -------------------------------------------------------------------------- consensus


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3, 6])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_consensus_matches_float64_reference(shape: tuple[int, ...], n: int, k: int) -> None:
    base, tuned = _random(shape, n, seed=n * 1000 + k * 10 + sum(shape))
    rng = np.random.default_rng(k)
    weights = rng.uniform(0.3, 1.5, n)
    lambdas = rng.uniform(0.1, 1.0, n)
    out = consensus(
        torch.from_numpy(base),
        torch.from_numpy(tuned),
        torch.from_numpy(weights),
        torch.from_numpy(lambdas),
        k=k,
        scale=0.7,
    )
    expected = ref_consensus(base, tuned, weights, lambdas, k, 0.7)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_tall_masks_and_consensus_golden_case() -> None:
    # base 0; τ_1 = [1, 2, 0.5, 0], τ_2 = [1, 0, -0.5, 0], τ_3 = [-0.1, 0, 0, 3]; λ_t = 0.6
    # τ_MTL = [1.9, 2, 0, 3]
    # entry 0: rest_1 = 0.9 -> 1 ≥ 0.54 ✓; rest_2 = 0.9 -> ✓; rest_3 = 2 -> 0.1 ≥ 1.2 ✗  votes 2
    # entry 1: rest_1 = 0 -> ✓; rest_2 = 2 -> 0 ≥ 1.2 ✗; rest_3 = 2 -> ✗               votes 1
    # entry 2: rest_1 = -0.5 -> 0.5 ≥ 0.3 ✓; rest_2 = 0.5 -> ✓; rest_3 = 0 -> 0 ≥ 0 ✓   votes 3
    # entry 3: rest_1 = 3 -> ✗; rest_2 = 3 -> ✗; rest_3 = 0 -> ✓                          votes 1
    # k = 2 keeps entries 0 and 2: out = [1.9, 0, 0, 0] (entry 2 of τ_MTL is 0)
    deltas = torch.tensor([[1.0, 2.0, 0.5, 0.0], [1.0, 0.0, -0.5, 0.0], [-0.1, 0.0, 0.0, 3.0]])
    deltas = deltas.double()
    masks = tall_masks(deltas, torch.full((3,), 0.6))
    assert masks.int().tolist() == [[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1]]
    out = consensus(
        torch.zeros(4, dtype=torch.float64), deltas, torch.ones(3), torch.full((3,), 0.6)
    )
    torch.testing.assert_close(out, torch.tensor([1.9, 0.0, 0.0, 0.0], dtype=torch.float64))
    # k = 1 keeps every entry some mask selects (all four here): plain sum
    out = consensus(
        torch.zeros(4, dtype=torch.float64), deltas, torch.ones(3), torch.full((3,), 0.6), k=1
    )
    torch.testing.assert_close(out, torch.tensor([1.9, 2.0, 0.0, 3.0], dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 5), scale=st.floats(-2, 2))
def test_consensus_properties(seed: int, n: int, scale: float) -> None:
    base, tuned = _random((5, 4), n, seed)
    rng = np.random.default_rng(seed)
    weights = torch.from_numpy(rng.uniform(0.2, 2.0, n))
    lambdas = torch.from_numpy(rng.uniform(0.0, 1.0, n))
    b, x = torch.from_numpy(base), torch.from_numpy(tuned)
    # k = 0 keeps everything: task arithmetic
    expected = b + scale * sum(float(weights[t]) * (x[t] - b) for t in range(n))
    torch.testing.assert_close(consensus(b, x, weights, lambdas, k=0, scale=scale), expected)
    # more votes than models: nothing is kept
    assert torch.equal(consensus(b, x, weights, lambdas, k=n + 1, scale=scale), b)
    # permuting models together with their parameters changes nothing (up to rounding)
    p = torch.from_numpy(rng.permutation(n))
    torch.testing.assert_close(
        consensus(b, x[p], weights[p], lambdas[p], scale=scale),
        consensus(b, x, weights, lambdas, scale=scale),
    )
    # each kept entry is the full weighted sum; each dropped entry is the base
    out = consensus(b, x, weights, lambdas, scale=1.0)
    kept = ~torch.isclose(out, b, rtol=0, atol=0)
    torch.testing.assert_close(out[kept], expected_sum(b, x, weights)[kept])
    # identical fine-tunes that equal the base: the base, bit for bit
    same = b.expand(n, 5, 4).clone()
    assert torch.equal(consensus(b, same, weights, lambdas, scale=scale), b)


def expected_sum(b: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return b + sum(float(weights[t]) * (x[t] - b) for t in range(x.shape[0]))


def test_consensus_float32_and_inputs_untouched() -> None:
    base, tuned = _random((64, 33), 4, seed=11)
    b32, x32 = torch.from_numpy(base.astype(np.float32)), torch.from_numpy(tuned.astype(np.float32))
    copies = (b32.clone(), x32.clone())
    weights, lambdas = (
        torch.ones(4, dtype=torch.float64),
        torch.full((4,), 0.6, dtype=torch.float64),
    )
    out = consensus(b32, x32, weights, lambdas)
    assert out.dtype == torch.float32
    assert torch.equal(b32, copies[0]) and torch.equal(x32, copies[1])
    expected = ref_consensus(
        b32.double().numpy(), x32.double().numpy(), np.ones(4), np.full(4, 0.6), 2, 1.0
    )
    # float32 rounding may flip a mask exactly at its threshold; nearly all entries agree
    close = np.isclose(out.numpy(), expected, atol=1e-5)
    assert close.mean() > 0.999


# ---------------------------------------------------------------------- registry rows


def test_adapters_and_registry_rows() -> None:
    base, tuned = _random((3, 4), 3, seed=5)
    b, x = torch.from_numpy(base), torch.from_numpy(tuned)
    inputs = MethodInputs(
        tensors=x.clone(),
        base=b,
        per_model={
            "weight": torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64),
            "tall_lambda": torch.tensor([0.6, 0.3, 0.4], dtype=torch.float64),
        },
        params={"lambda": 0.8, "k": 2},
    )
    np.testing.assert_allclose(
        run_consensus(inputs).numpy(),
        ref_consensus(base, tuned, np.array([1.0, 0.5, 2.0]), np.array([0.6, 0.3, 0.4]), 2, 0.8),
        rtol=1e-12,
        atol=1e-12,
    )
    np.testing.assert_allclose(run_magmax(inputs).numpy(), ref_magmax(base, tuned, 0.8))
    magmax_row, consensus_row = METHODS["magmax"], METHODS["consensus"]
    assert {p.name: p.default for p in magmax_row.params} == {"lambda": 0.5}
    assert {p.name: p.default for p in consensus_row.params} == {
        "weight": 1.0,
        "tall_lambda": 0.6,
        "k": 2,
        "lambda": 1.0,
    }
    tall_lambda = consensus_row.param("tall_lambda")
    assert tall_lambda is not None and tall_lambda.per_model
    assert consensus_row.min_models == 2
