"""kth_largest: the sampled-bracket selection equals torch.kthvalue on every input.

The shortcut runs for tensors above 4 × the sample size; the tests shrink the sample so that
small tensors take it, and include inputs built to defeat the sample (periodic data aliasing
with the stride, heavy ties, NaNs), where the full ``kthvalue`` must take over.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods import task_vectors
from alloykit.methods.task_vectors import kth_largest, top_mask


def expected(flat: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN equals NaN here


@pytest.fixture
def small_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_vectors, "_SAMPLE", 32)


def make(kind: str, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=generator).abs()
    if kind == "ties":
        return torch.randint(0, 4, (n,), generator=generator).float()
    if kind == "constant":
        return torch.full((n,), 0.25)
    if kind == "sorted":
        return torch.randn(n, generator=generator).abs().sort().values
    if kind == "periodic":  # every sampled element (stride n // 32) is the same value
        return (torch.arange(n) % (n // 32)).float()
    if kind == "nan":
        values = torch.randn(n, generator=generator).abs()
        values[torch.randint(0, n, (max(1, n // 50),), generator=generator)] = float("nan")
        return values
    raise AssertionError(kind)


KINDS = ["normal", "ties", "constant", "sorted", "periodic", "nan"]


@pytest.mark.usefixtures("small_sample")
@settings(max_examples=120, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(129, 5000),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_kth_largest_equals_kthvalue(kind: str, n: int, fraction: float, seed: int) -> None:
    flat = make(kind, n, seed)
    k = min(n, max(1, round(fraction * n)))
    assert same(kth_largest(flat, k), expected(flat, k))


@pytest.mark.usefixtures("small_sample")
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_ranks(kind: str) -> None:
    flat = make(kind, 4096, 3)
    for k in (1, 2, 4095, 4096, 2048):
        assert same(kth_largest(flat, k), expected(flat, k)), k


@pytest.mark.usefixtures("small_sample")
def test_top_mask_keeps_exactly_k_with_ties_by_index() -> None:
    flat = make("ties", 3000, 1)
    for k in (1, 700, 1500, 2999):
        keep = top_mask(flat, k)
        assert int(keep.sum()) == k
        threshold = expected(flat, k)
        assert bool((flat[keep] >= threshold).all())
        tied = (flat == threshold).nonzero().squeeze(1)
        kept_ties = tied[keep[tied]]
        assert torch.equal(kept_ties, tied[: kept_ties.numel()])  # the lowest indices


def test_default_sample_path_on_a_large_tensor() -> None:
    """At the real sample size: a 300k-element tensor takes the shortcut."""
    flat = make("normal", 300_000, 7)
    for k in (1, 3_000, 150_000, 299_999):
        assert kth_largest(flat, k) == expected(flat, k)


@pytest.mark.usefixtures("small_sample")
@pytest.mark.parametrize(
    ("kind", "shortcut"), [("normal", True), ("periodic", False), ("nan", False)]
)
def test_shortcut_taken_only_when_the_bracket_holds(
    kind: str, shortcut: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shortcut selects from a band smaller than the tensor, without falling back to the
    # whole tensor (the fused loops' radix select or NumPy's, whichever runs)
    bands: list[int] = []
    whole: list[int] = []
    real_band, real_whole = task_vectors._band_statistic, task_vectors._whole_statistic

    def band(values: torch.Tensor, *args: Any) -> tuple[float, int]:
        bands.append(values.numel())
        return real_band(values, *args)

    def everything(flat: torch.Tensor, *args: Any) -> tuple[float, int]:
        whole.append(flat.numel())
        return real_whole(flat, *args)

    monkeypatch.setattr(task_vectors, "_band_statistic", band)
    monkeypatch.setattr(task_vectors, "_whole_statistic", everything)
    flat = make(kind, 20_000, 5)
    kth_largest(flat, 5_000)
    assert (bool(bands) and bands[-1] < flat.numel() and not whole) is shortcut, (bands, whole)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_vectors, "_CHUNK", 16)


@pytest.mark.usefixtures("small_sample", "small_chunks")
@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["normal", "ties", "constant", "sorted"]),
    n=st.integers(1, 3000),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    negate=st.booleans(),
)
def test_top_values_equal_delta_times_top_mask(
    kind: str, n: int, fraction: float, seed: int, negate: bool
) -> None:
    """Signed deltas with heavy ties: the float path keeps exactly the entries top_mask keeps."""
    magnitudes = make(kind, max(n, 129), seed)[:n]
    signs = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0) * (-1.0 if negate else 1.0)
    delta = magnitudes * signs
    k = round(fraction * n)
    expected_values = delta * top_mask(delta.abs(), k)
    kept = delta.clone()
    task_vectors.keep_top_(kept, task_vectors.magnitude_cut(delta, k))
    assert torch.equal(kept, expected_values)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("ties", [0, 1, 15, 16, 17, 40, 1000])
def test_threshold_values_take_the_first_ties_by_index(ties: int) -> None:
    delta = torch.tensor([0.5, -0.25, 0.25, 0.1] * 25)  # 50 entries of magnitude 0.25
    out = delta.clone()
    task_vectors.keep_top_(out, task_vectors.Cut(0.25, ties))
    tied = (delta.abs() == 0.25).nonzero().squeeze(1)
    keep = delta.abs() > 0.25
    keep[tied[:ties]] = True
    assert torch.equal(out, delta * keep)


def test_dare_keeps_exactly_where_the_draw_is_below_the_density() -> None:
    delta = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for density in (0.1, 0.5, 0.9, 1 / 3):
        out = task_vectors.sparsify(
            delta, "random", density=density, generator=torch.Generator().manual_seed(4)
        )
        key = task_vectors.draw_key(torch.Generator().manual_seed(4), torch.device("cpu"))
        draws = task_vectors.counter_uniform(key, 0, 5000, torch.device("cpu"))
        assert torch.equal(out, delta * (draws < density))
