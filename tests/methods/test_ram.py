"""RAM and RAM+ tensor-local (arXiv:2601.13572) against an independent NumPy reading.

Per position, the models whose ``|x_i − base| > epsilon`` contribute: one contributor's change
is taken whole (times ``λ_i = 1 + r·clamp(ρ_i, 0, alpha)`` in RAM+, ``ρ_i`` the ratio of the
model's shared to unique active positions, the unique count floored at ``epsilon``), several
contributors' changes are averaged, none leaves the base (MergeKit's ``ram`` and
``ramplus_tl``, reference §1.11).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods.ram import activity, ram, ramplus_tl, run_ram, run_ramplus_tl
from alloykit.methods.registry import MethodInputs


def reference(
    base: np.ndarray,
    models: np.ndarray,
    epsilon: float,
    plus: bool = False,
    r: float = 0.1,
    alpha: float = 0.2,
) -> np.ndarray:
    k = models.shape[0]
    deltas = (models - base).reshape(k, -1)
    contributors = [
        [i for i in range(k) if abs(deltas[i, j]) > epsilon] for j in range(deltas.shape[1])
    ]
    scale = np.ones(k)
    if plus:
        for i in range(k):
            shared = sum(1 for c in contributors if i in c and len(c) > 1)
            unique = sum(1 for c in contributors if c == [i])
            if max(unique, epsilon) == 0:  # no unique entry to scale
                continue
            rho = shared / max(unique, epsilon)
            scale[i] = 1 + r * min(max(rho, 0.0), alpha)
    merged = np.zeros(deltas.shape[1])
    for j, c in enumerate(contributors):
        if len(c) == 1:
            merged[j] = scale[c[0]] * deltas[c[0], j]
        elif len(c) > 1:
            merged[j] = sum(deltas[i, j] for i in c) / len(c)
    return base + merged.reshape(base.shape)


def as_tensor(values: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).to(dtype)


def sparse_models(
    rng: np.random.Generator, k: int, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """A base and k fine-tunes that each change a random ~half of the entries."""
    base = rng.normal(size=shape)
    changed = rng.random(size=(k, *shape)) < 0.5
    return base, base + rng.normal(scale=0.1, size=(k, *shape)) * changed


SHAPES = [(1,), (7,), (5, 3), (4, 9), (2, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_matches_reference(shape: tuple[int, ...], k: int, epsilon: float) -> None:
    rng = np.random.default_rng(hash((shape, k, epsilon)) % 2**32)
    base, models = sparse_models(rng, k, shape)
    got = ram(as_tensor(base), as_tensor(models), epsilon=epsilon)
    np.testing.assert_allclose(got.numpy(), reference(base, models, epsilon), rtol=1e-12)
    for r, alpha in [(0.1, 0.2), (0.5, 1.0), (2.0, 5.0)]:
        got = ramplus_tl(as_tensor(base), as_tensor(models), r=r, alpha=alpha, epsilon=epsilon)
        expected = reference(base, models, epsilon, plus=True, r=r, alpha=alpha)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


# Hand-worked case, base = 0, epsilon = 0.05:
#   δ_1 = ( 0.5,  0.01, 0.2, 0.0, -0.3)   active T F T F T
#   δ_2 = ( 0.3, -0.2,  0.0, 0.4,  0.1)   active T T F T T
#   δ_3 = ( 0.1,  0.02, 0.0, 0.0, -0.5)   active T F F F T
# count c = (3, 1, 1, 1, 3): positions 1, 2, 3 unique (to models 2, 1, 2), 0 and 4 shared.
HAND = [
    [0.5, 0.01, 0.2, 0.0, -0.3],
    [0.3, -0.2, 0.0, 0.4, 0.1],
    [0.1, 0.02, 0.0, 0.0, -0.5],
]


def test_golden_ram_by_hand() -> None:
    # pos 0: (0.5 + 0.3 + 0.1)/3 = 0.3; pos 1: -0.2 (0.01 and 0.02 are below epsilon);
    # pos 2: 0.2; pos 3: 0.4; pos 4: (-0.3 + 0.1 - 0.5)/3 = -0.7/3
    got = ram(torch.zeros(5, dtype=torch.float64), as_tensor(HAND), epsilon=0.05)
    np.testing.assert_allclose(got.numpy(), [0.3, -0.2, 0.2, 0.4, -0.7 / 3], rtol=1e-14)


def test_golden_ramplus_by_hand() -> None:
    # r = 0.5, alpha = 3:
    #   model 1: shared 2 (pos 0, 4), unique 1 (pos 2): ρ = 2, λ = 1 + 0.5·2 = 2
    #   model 2: shared 2, unique 2 (pos 1, 3): ρ = 1, λ = 1.5
    #   model 3: shared 2, unique 0: ρ = 2/0.05 = 40 -> clamped to 3, λ = 2.5 (no unique entry)
    # out = (0.3, -0.2·1.5, 0.2·2, 0.4·1.5, -0.7/3) = (0.3, -0.3, 0.4, 0.6, -0.7/3)
    got = ramplus_tl(
        torch.zeros(5, dtype=torch.float64), as_tensor(HAND), r=0.5, alpha=3.0, epsilon=0.05
    )
    np.testing.assert_allclose(got.numpy(), [0.3, -0.3, 0.4, 0.6, -0.7 / 3], rtol=1e-14)
    # MergeKit's defaults r = 0.1, alpha = 0.2: every ρ ≥ 0.2, so every λ = 1.02
    got = ramplus_tl(torch.zeros(5, dtype=torch.float64), as_tensor(HAND), epsilon=0.05)
    np.testing.assert_allclose(got.numpy(), [0.3, -0.204, 0.204, 0.408, -0.7 / 3], rtol=1e-14)


def test_threshold_is_strict() -> None:
    # |δ| = 0.5 is not > 0.5: inactive, so the base is kept there
    base = torch.zeros(2, dtype=torch.float64)
    models = torch.tensor([[0.5, 0.75]], dtype=torch.float64)
    assert ram(base, models, epsilon=0.5).tolist() == [0.0, 0.75]
    found = activity(models - base, 0.5)
    assert found.count.tolist() == [0, 1]


def test_edge_cases() -> None:
    base = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    # all-zero deltas: the base
    assert torch.equal(ram(base, torch.stack([base, base])), base)
    assert torch.equal(ramplus_tl(base, torch.stack([base, base])), base)
    # identical changed models: shared everywhere, the average is the model
    twins = torch.stack([base + 1, base + 1])
    torch.testing.assert_close(ram(base, twins), base + 1)
    torch.testing.assert_close(ramplus_tl(base, twins), base + 1)
    # opposite signs cancel in the average
    opposite = torch.stack([base + 1, base - 1])
    torch.testing.assert_close(ram(base, opposite), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_inputs_untouched(dtype: torch.dtype) -> None:
    base = torch.linspace(-1, 1, 8, dtype=dtype).reshape(2, 4)
    models = torch.stack([base + 0.1, base, base - 0.2 * base])
    before = models.clone()
    for out in (ram(base, models), ramplus_tl(base, models)):
        assert out.dtype == dtype and out.shape == base.shape
    assert torch.equal(models, before)


def test_adapters() -> None:
    base = torch.zeros(5, dtype=torch.float64)
    inputs = MethodInputs(as_tensor(HAND), base, {}, {"epsilon": 0.05})
    torch.testing.assert_close(run_ram(inputs), ram(base, as_tensor(HAND), epsilon=0.05))
    inputs = MethodInputs(as_tensor(HAND), base, {}, {"epsilon": 0.05, "r": 0.5, "alpha": 3.0})
    expected = ramplus_tl(base, as_tensor(HAND), r=0.5, alpha=3.0, epsilon=0.05)
    torch.testing.assert_close(run_ramplus_tl(inputs), expected)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(min_value=1, max_value=4),
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=2),
    st.floats(min_value=0.0, max_value=0.2),
    st.floats(min_value=-1.0, max_value=2.0),
    st.floats(min_value=0.0, max_value=3.0),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_reference_and_permutation(
    k: int, shape: list[int], epsilon: float, r: float, alpha: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    base, models = sparse_models(rng, k, tuple(shape))
    for plus in (False, True):
        if plus:
            got = ramplus_tl(as_tensor(base), as_tensor(models), r=r, alpha=alpha, epsilon=epsilon)
        else:
            got = ram(as_tensor(base), as_tensor(models), epsilon=epsilon)
        expected = reference(base, models, epsilon, plus=plus, r=r, alpha=alpha)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    permutation = rng.permutation(k)
    np.testing.assert_allclose(
        ramplus_tl(
            as_tensor(base), as_tensor(models[permutation]), r=r, alpha=alpha, epsilon=epsilon
        ).numpy(),
        ramplus_tl(as_tensor(base), as_tensor(models), r=r, alpha=alpha, epsilon=epsilon).numpy(),
        rtol=1e-12,
        atol=1e-14,
    )
