"""The task-vector steps run block by block (bounded temporaries); these tests check that the
blockwise passes give exactly what one whole-tensor reading of each rule gives, on tensors
large enough to span several blocks and to take the sampled-bracket selection path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from alloykit.methods.reductions import stable_row_sums
from alloykit.methods.task_vectors import (
    Steps,
    blocks,
    counter_uniform,
    della_mask,
    draw_key,
    merge_deltas,
    sparsify_,
    stable_sum_of,
)

N = 5 * 65536 + 1234  # above the 4 x 65536 of the sampled bracket; several blocks


def tied_values(seed: int, n: int = N) -> torch.Tensor:
    """Values rounded to a coarse grid, so many magnitudes tie at any threshold."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.round(rng.standard_normal(n) * 50) / 50).float()


def top_k_reference(values: torch.Tensor, k: int) -> np.ndarray:
    """Boolean mask of the k largest |x|, ties to the lower index: a full stable sort."""
    magnitude = np.abs(values.numpy().astype(np.float64))
    order = np.lexsort((np.arange(magnitude.size), -magnitude))
    keep = np.zeros(magnitude.size, dtype=bool)
    keep[order[: max(0, min(k, magnitude.size))]] = True
    return keep


def test_blocks_cover_the_tensor_in_order() -> None:
    parts = blocks(N)
    assert len(parts) > 1
    assert parts[0].start == 0 and parts[-1].stop == N
    assert all(a.stop == b.start for a, b in itertools.pairwise(parts))


@pytest.mark.parametrize("transform", ["abs", "square"])
def test_stable_sum_of_is_bit_identical_to_the_whole_tensor_sum(transform: str) -> None:
    values = torch.randn(N, generator=torch.Generator().manual_seed(1))
    if transform == "abs":
        whole = float(stable_row_sums(values.abs()))
        assert stable_sum_of(values, torch.abs) == whole
    else:
        whole = float(stable_row_sums(values.double() ** 2))
        assert stable_sum_of(values, lambda x: x.double() ** 2) == whole


@pytest.mark.parametrize("density", [0.013, 0.5, 0.97])
def test_magnitude_keeps_the_exact_top_k_with_ties_in_index_order(density: float) -> None:
    values = tied_values(2)
    expected = values.numpy() * top_k_reference(values, max(1, int(density * N)))
    got = sparsify_(values.clone(), "magnitude", density=density)
    assert np.array_equal(got.numpy(), expected)


def test_breadcrumbs_keeps_the_ranks_between_the_two_cuts() -> None:
    values = tied_values(3)
    density, gamma = 0.4, 0.05
    target, n_top = int(density * N), int(gamma * N)
    keep = top_k_reference(values, N - (N - target - n_top)) & ~top_k_reference(values, n_top)
    got = sparsify_(values.clone(), "breadcrumbs", density=density, gamma=gamma)
    assert np.array_equal(got.numpy(), values.numpy() * keep)
    assert int(np.count_nonzero(keep)) == target


def test_dare_draws_are_those_of_one_whole_tensor_draw() -> None:
    values = torch.randn(N, generator=torch.Generator().manual_seed(4)) + 3.0  # no zeros
    key = draw_key(torch.Generator().manual_seed(9), torch.device("cpu"))
    draws = counter_uniform(key, 0, N, torch.device("cpu"))
    expected = np.where(draws.numpy() < 0.3, values.numpy(), 0.0) / np.float32(0.3)
    got = sparsify_(
        values.clone(),
        "random",
        density=0.3,
        generator=torch.Generator().manual_seed(9),
        rescale="inverse",
    )
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


def test_della_row_blocks_equal_one_whole_matrix_pass() -> None:
    matrix = torch.randn(700, 1100, generator=torch.Generator().manual_seed(5))
    key = draw_key(torch.Generator().manual_seed(6), torch.device("cpu"))
    draws = counter_uniform(key, 0, matrix.numel(), torch.device("cpu")).view(matrix.shape)
    expected = matrix * della_mask(matrix.abs(), 0.4, 0.1, draws)
    before = float(stable_row_sums(matrix.abs().reshape(-1)))
    after = float(stable_row_sums(expected.abs().reshape(-1)))
    expected = expected * (before / after)
    got = sparsify_(
        matrix.clone(),
        "della",
        density=0.4,
        epsilon=0.1,
        generator=torch.Generator().manual_seed(6),
        rescale="l1",
    )
    assert torch.equal(got, expected)


def test_blockwise_ties_merge_equals_a_float64_reading() -> None:
    """Trim, elect by mass, disjoint mean over several blocks against NumPy float64."""
    rng = np.random.default_rng(7)
    deltas = rng.standard_normal((3, N)).astype(np.float32)
    weights = np.array([0.5, 1.0, 0.7])
    got = merge_deltas(
        torch.from_numpy(deltas.copy()),
        torch.from_numpy(weights),
        Steps(sparsify="magnitude", elect="mass", normalize=True),
        torch.tensor([0.3, 0.3, 0.3]),
    )
    trimmed = np.stack(
        [d * top_k_reference(torch.from_numpy(d), int(0.3 * N)) for d in deltas]
    ).astype(np.float64)
    weighted = trimmed * weights[:, None]
    sign = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    agree = (np.sign(weighted) == sign) & (weighted != 0)
    divisor = (agree * weights[:, None]).sum(axis=0)
    expected = (weighted * agree).sum(axis=0) / np.where(divisor == 0, 1.0, divisor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
