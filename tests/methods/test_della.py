"""DELLA (MagPrune): keep probabilities from magnitude ranks, checked against the formula.

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv:2406.11617; MergeKit's ``della_magprune`` (reference §1.3):
per row, rank ``|δ|`` ascending, ``p = (density − ε) + 2ε·rank/(n − 1)``, keep with
probability ``p``. The reference ranks below are counted pairwise in NumPy (O(n²), no sort):
``rank_j = #{i: m_i < m_j} + (#{i: m_i = m_j} − 1)/2``, equal magnitudes sharing their
average rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit import MergeOptions, load_config, merge_to_state_dict
from alloykit.errors import ConfigError
from alloykit.methods.task_vectors import della_mask, merge_task_vectors, sparsify


def reference_probability(magnitude: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """The keep probability of every entry of a (rows, n) array, read off the formula."""
    n = magnitude.shape[1]
    if n == 1:
        return np.full(magnitude.shape, density)
    below = (magnitude[:, None, :] < magnitude[:, :, None]).sum(axis=2)
    equal = (magnitude[:, None, :] == magnitude[:, :, None]).sum(axis=2)
    rank = below + (equal - 1) / 2
    return (density - epsilon) + (2 * epsilon) * rank / (n - 1)


def check_mask(magnitude: torch.Tensor, density: float, epsilon: float, seed: int) -> None:
    uniform = torch.rand(magnitude.shape, generator=torch.Generator().manual_seed(seed))
    ours = della_mask(magnitude, density, epsilon, uniform).numpy()
    p = reference_probability(magnitude.double().numpy(), density, epsilon)
    expected = uniform.double().numpy() < p
    np.testing.assert_array_equal(ours, expected)


def test_hand_worked_row() -> None:
    # |δ| = [0.1, 0.3, 0.2] has ranks [0, 2, 1]; with density 0.5, ε = 0.2, n = 3:
    # p = 0.3 + 0.4·rank/2 = [0.3, 0.7, 0.5]. Draws [0.29, 0.69, 0.51] keep, keep, drop.
    magnitude = torch.tensor([[0.1, 0.3, 0.2]])
    uniform = torch.tensor([[0.29, 0.69, 0.51]])
    assert della_mask(magnitude, 0.5, 0.2, uniform).tolist() == [[True, True, False]]
    # draws just above each p drop everything
    assert della_mask(magnitude, 0.5, 0.2, torch.tensor([[0.31, 0.71, 0.51]])).tolist() == [
        [False, False, False]
    ]


def test_equal_magnitudes_share_their_average_rank() -> None:
    # [0.5, 0.5, 0.5, 0.9]: the three ties share rank (0+1+2)/3 = 1, so p = 0.3 + 0.4/3 ≈ 0.4333
    # for each; 0.9 has rank 3, p = 0.7. Draws of 0.43 keep the ties, 0.44 drop them.
    magnitude = torch.tensor([[0.5, 0.5, 0.5, 0.9]])
    assert della_mask(magnitude, 0.5, 0.2, torch.full((1, 4), 0.43)).tolist() == [[True] * 4]
    assert della_mask(magnitude, 0.5, 0.2, torch.full((1, 4), 0.44)).tolist() == [
        [False, False, False, True]
    ]


@pytest.mark.parametrize(
    "name",
    ["gaussian", "ties", "zeros", "zero_rows", "one_column", "bf16_deltas", "outliers", "float64"],
)
def test_mask_equals_the_formula(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(24, 97, generator=generator)
    if name == "ties":
        values = (values * 4).round() / 4
    elif name == "zeros":
        values[values.abs() < 0.7] = 0
    elif name == "zero_rows":
        values[::3] = 0
    elif name == "one_column":
        values = values[:, :1]
    elif name == "bf16_deltas":  # differences of bfloat16 weights: few distinct values
        a = torch.randn(24, 97, generator=generator)
        values = a.bfloat16().float() - (a + 0.01 * values).bfloat16().float()
    elif name == "outliers":  # 40 binades between entries of one row
        values[:, :3] *= 1e6
        values[:, 3:20] *= 1e-6
    elif name == "float64":
        values = values.double() * (1 + 1e-12 * torch.arange(97, dtype=torch.float64))
    for density, epsilon in [(0.5, 0.2), (0.1, 0.05), (0.9, 0.0999)]:
        check_mask(values.abs(), density, epsilon, seed=int(density * 100))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    n=st.integers(1, 40),
    levels=st.integers(1, 8),
    density=st.floats(0.2, 0.8),
    seed=st.integers(0, 2**16),
)
def test_mask_equals_the_formula_on_any_row(
    rows: int, n: int, levels: int, density: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(0, levels, (rows, n), generator=generator).float() / levels
    check_mask(magnitude, density, 0.15, seed)


def test_keep_rate_per_row_is_within_binomial_bounds() -> None:
    n, density, epsilon = 20000, 0.3, 0.2
    delta = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
    out = sparsify(
        delta, "della", density=density, epsilon=epsilon, generator=torch.Generator().manual_seed(5)
    )
    p = reference_probability(delta.abs().double().numpy(), density, epsilon)
    for row in range(4):
        kept = int((out[row] != 0).sum())
        mean, sd = p[row].sum(), math.sqrt((p[row] * (1 - p[row])).sum())
        assert abs(kept - mean) < 5 * sd, (kept, mean, sd)
    # larger magnitudes are kept more often: top third against bottom third
    order = delta.abs().numpy().argsort(axis=1)
    kept = (out != 0).numpy()
    low = np.take_along_axis(kept, order[:, : n // 3], 1).mean()
    high = np.take_along_axis(kept, order[:, -n // 3 :], 1).mean()
    assert low == pytest.approx(density - epsilon * 2 / 3, abs=0.02)
    assert high == pytest.approx(density + epsilon * 2 / 3, abs=0.02)


def test_l1_rescale_keeps_the_norm_and_density_edges() -> None:
    delta = torch.randn(8, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = sparsify(
        delta,
        "della",
        density=0.4,
        epsilon=0.1,
        generator=torch.Generator().manual_seed(0),
        rescale="l1",
    )
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-12)
    assert torch.equal(sparsify(delta, "della", density=1.0, epsilon=0.5), delta)
    assert not sparsify(delta, "della", density=0.0, epsilon=0.5).any()
    with pytest.raises(ValueError, match="density ± epsilon must lie inside"):
        sparsify(delta, "della", density=0.1, epsilon=0.1)
    with pytest.raises(ValueError, match="della rescales by the L1 norm"):
        sparsify(delta, "della", density=0.5, epsilon=0.1, rescale="inverse")


def test_della_at_density_one_is_ties_without_trim() -> None:
    # base 0; u = w·δ with w = (1, 1, 1); per element the elected sign's entries are averaged:
    # column 0: +1, +3, −1 → sum +3 → mean of {1, 3} = 2; column 1: −2, −2, +5 → +1 → 5;
    # column 2: 0, 0, 0 → 0.
    tensors = torch.tensor([[1.0, -2.0, 0.0], [3.0, -2.0, 0.0], [-1.0, 5.0, 0.0]])
    out = merge_task_vectors(
        torch.zeros(3),
        tensors,
        torch.ones(3),
        torch.ones(3),
        sparsify="della",
        elect="mass",
        normalize=True,
        rescale="l1",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.tolist() == [2.0, 5.0, 0.0]


def della_recipe(family: dict[str, Path], method: str, **model: float) -> dict[str, object]:
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.5, **model}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.5, "density": 0.3}},
        ],
    }


def test_bad_epsilon_is_a_config_error_naming_the_model(family: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"model 1: epsilon 0.6 with density 0.5"):
        merge_to_state_dict(della_recipe(family, "della", epsilon=0.6))
    inverse = {**della_recipe(family, "della_linear"), "parameters": {"rescale_mode": "inverse"}}
    with pytest.raises(ConfigError, match="della rescales by the L1 norm"):
        merge_to_state_dict(inverse)
    # epsilon is per model and in [0, 1] for both presets
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.epsilon: 1.5 is outside"):
        load_config(della_recipe(family, "della_linear", epsilon=1.5))


def test_della_merges_differ_from_their_undropped_form(family: dict[str, Path]) -> None:
    seeded = MergeOptions(seed=11)
    della = merge_to_state_dict(della_recipe(family, "della"), seeded)
    again = merge_to_state_dict(della_recipe(family, "della"), seeded)
    linear = merge_to_state_dict(della_recipe(family, "della_linear"), seeded)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(della[name], again[name])
    assert not torch.equal(della[name], linear[name])
