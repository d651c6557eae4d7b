"""Task-vector methods: merges of the differences between each fine-tune and the base.

A task vector is ``δ_i = x_i − base`` (Ilharco et al. 2023, "Editing models with task
arithmetic", arXiv:2212.04089). Every method here is the same three steps, each written once:

1. **sparsify** each task vector: ``none``; ``magnitude`` (TIES trim: keep the top-k by
   magnitude, Yadav et al. 2023, arXiv:2306.01708); ``random`` (DARE drop-and-rescale, Yu et al.
   2023, arXiv:2311.03099); ``breadcrumbs`` (drop the smallest and the largest, Davari &
   Belilovsky 2023, arXiv:2312.06795); ``della`` (keep each entry with a probability that grows
   with its magnitude rank in its row, Deep et al. 2024, DELLA-Merging, arXiv:2406.11617);
2. **elect** a sign per element: ``none``; ``mass`` (the sign of the weighted sum, TIES);
   ``count`` (the sign most models have, PEFT's option);
3. **combine** the agreeing, weighted task vectors: ``sum`` (optionally divided by the sum of
   the agreeing weights) or ``mean`` (divided by the number of agreeing models), times λ.

Named methods (``ties``, ``dare_ties``, ...) are presets: a choice of steps and defaults.

Every magnitude ranking uses one total order: larger ``|δ|`` first, and among equal magnitudes
the lower flat index first, so exactly k elements are kept, deterministically. Selection is
O(n) (``torch.kthvalue`` plus a count of ties), never a sort; DELLA's ranks come from a
histogram of the magnitudes' float bits (see :func:`della_mask`). Sums that decide a result
(norms, sign votes) run in a fixed order, so outputs do not depend on the thread count.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from alloykit.methods.reductions import PARTIAL_SUM as _PARTIAL
from alloykit.methods.reductions import stable_row_sums, sum_in_order

Sparsifier = Literal["none", "magnitude", "random", "breadcrumbs", "della"]
Election = Literal["none", "mass", "count"]
Combination = Literal["sum", "mean"]
Rescale = Literal["none", "l1", "inverse"]
DeltaNorm = Literal["none", "l1", "l2"]

# MergeKit treats a weight sum below this as zero and then does not divide (reference §1.2).
ZERO_WEIGHT_SUM = 1e-8
# MergeKit's L1 rescale is skipped when either norm is below this (reference §1.3).
RESCALE_EPSILON = 1e-7


def fused_loops(*tensors: torch.Tensor) -> Any | None:
    """The fused CPU loops (:mod:`alloykit.methods._loops`) when they apply to ``tensors``:
    contiguous float32/float64 CPU tensors, numba importable and not switched off with
    ``ALLOYKIT_FUSED=0``. None otherwise (the torch code then runs, as on other devices)."""
    if not all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous()
        for t in tensors
    ):
        return None
    loops = _import_loops()
    if loops is not None:
        loops.use_threads(torch.get_num_threads())
    return loops


@functools.cache
def _import_loops() -> Any | None:
    if os.environ.get("ALLOYKIT_FUSED", "1") == "0":
        return None
    try:
        from alloykit.methods import _loops
    except ImportError:  # numba missing or unusable on this platform: the torch path runs
        return None
    return _loops


def stable_sum(values: torch.Tensor) -> float:
    """Sum of all elements in float64, in an order fixed by the size alone (not by threads)."""
    return float(stable_row_sums(values.reshape(-1)))


def _block_size(n: int) -> int:
    """Elements per block of a blockwise pass over an ``n``-element tensor.

    A fixed function of ``n`` (never of memory or threads, so results do not depend on the
    machine) and a multiple of the stable sums' 8192-element partial sums: about a sixteenth
    of the tensor, between 16 Ki and 2 Mi elements. The passes' temporaries are a few blocks,
    not a few copies of the tensor.
    """
    size = min(max(n // 16, 1 << 14), 1 << 21)
    return -(-size // _PARTIAL) * _PARTIAL


def blocks(n: int) -> list[slice]:
    """The blocks of a blockwise pass over ``n`` elements, in order (:func:`_block_size`)."""
    size = _block_size(n)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def stable_sum_of(flat: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``stable_sum(transform(flat))`` for a 1-D tensor, bit for bit, one block at a time.

    ``transform`` is elementwise (``abs``, a square in float64, ...). The blocks are whole
    8192-element partial sums of :func:`stable_row_sums`, so the partial sums, and the tree
    that adds them, are the ones the whole tensor would give; only a block is transformed at
    once.
    """
    return stable_block_sum(flat.numel(), lambda block: transform(flat[block]))


def stable_abs_sum(flat: torch.Tensor) -> float:
    """``stable_sum_of(flat, torch.abs)`` (an L1 norm), bit for bit."""
    return _stable_sum_of_kind(flat, square=False)


def stable_square_sum(flat: torch.Tensor) -> float:
    """``stable_sum_of(flat, lambda x: x.double() ** 2)`` (a squared L2 norm), bit for bit."""
    return _stable_sum_of_kind(flat, square=True)


def _stable_sum_of_kind(flat: torch.Tensor, square: bool) -> float:
    loops = fused_loops(flat)
    n = flat.numel()
    if loops is None or n <= _PARTIAL:
        transform = (lambda x: x.double() ** 2) if square else torch.abs
        return stable_sum_of(flat, transform)
    return fused_block_sum(
        n, lambda block, out: loops.to_float64_(flat[block].numpy(), out.numpy(), square)
    )


def fused_block_sum(n: int, fill: Callable[[slice, torch.Tensor], None]) -> float:
    """``stable_block_sum`` of ``n`` float64 values that ``fill(block, out)`` writes into
    ``out`` (a fused loop), followed by zeros up to ``out``'s end.

    The same float64 blocks, zero-padded to whole partial sums, that :func:`stable_block_sum`
    makes (so the same partial sums and tree, bit for bit), built in one pass into one reused
    buffer instead of a transform, a conversion and a padded copy of each block."""
    buffer = torch.empty(_block_size(n), dtype=torch.float64)
    partials = []
    for block in blocks(n):
        m = block.stop - block.start
        part = buffer[: -(-m // _PARTIAL) * _PARTIAL]
        fill(block, part)
        partials.append(part.view(-1, _PARTIAL).sum(dim=1))
    return float(stable_row_sums(torch.cat(partials)))


def stable_block_sum(n: int, values: Callable[[slice], torch.Tensor]) -> float:
    """``stable_sum`` of an ``n``-element 1-D tensor given block by block: ``values(block)``
    returns the elements in ``block`` (a slice from :func:`blocks`); bit for bit the whole
    tensor's stable sum (see :func:`stable_sum_of`)."""
    if n <= _PARTIAL:
        return stable_sum(values(slice(0, n)))
    partials = []
    for block in blocks(n):
        part = values(block).to(torch.float64)
        part = torch.nn.functional.pad(part, (0, -part.numel() % _PARTIAL))
        partials.append(part.view(-1, _PARTIAL).sum(dim=1))
    return float(stable_row_sums(torch.cat(partials)))


def top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` top-ranked elements of a tensor of magnitudes.

    Ranked by value, ties broken by the lower flat index; exactly ``min(max(k, 0), n)``
    elements are True. O(n): one selection (:func:`kth_largest`) and the tied elements'
    indices.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    return threshold_mask(magnitude, threshold, k - int(torch.count_nonzero(flat > threshold)))


_CHUNK = 1 << 16  # elements per block when locating the n-th nonzero entry


def _prefix_holding(values: torch.Tensor, count: int) -> int:
    """The shortest prefix length of 1-D ``values`` that holds ``count`` nonzero entries (all
    of them when there are fewer): per-block counts, then one block scanned."""
    n = values.numel()
    full = n - n % _CHUNK
    counts = torch.count_nonzero(values[:full].view(-1, _CHUNK), dim=1) if full else None
    start, seen = 0, 0
    if counts is not None:
        cumulative = torch.cumsum(counts, dim=0)
        block = int(torch.searchsorted(cumulative, count))  # first block reaching count
        if block < counts.numel():
            start = block * _CHUNK
            seen = int(cumulative[block - 1]) if block else 0
        else:
            start, seen = full, int(cumulative[-1])
    positions = torch.nonzero(values[start : start + _CHUNK] if start < full else values[start:])
    needed = count - seen
    if needed <= 0:
        return start
    if needed > positions.shape[0]:
        return n
    return start + int(positions[needed - 1, 0]) + 1


_SAMPLE = 1 << 16  # elements sampled to bracket a selection
_BRACKET_SIGMAS = 6.0  # half-width of the bracket, in binomial standard deviations


def kth_largest(flat: torch.Tensor, k: int) -> float:
    """The ``k``-th largest value of a 1-D tensor (``1 <= k <= n``), exactly.

    Equal to ``torch.kthvalue(flat, n − k + 1)`` (NaN ordered above every number), by the
    selection :func:`magnitude_cut` uses: see :func:`_order_statistic`.
    """
    return _order_statistic(flat, flat.numel() - k + 1, absolute=False)[0]


def _order_statistic(flat: torch.Tensor, rank: int, absolute: bool) -> tuple[float, int]:
    """The ``rank``-th smallest (1-based) of ``flat`` (of ``|flat|`` when ``absolute``), and
    how many exceed it.

    Small tensors: an exact select. Large ones take a shortcut that gives the same value: a
    fixed strided sample of 65 536 elements brackets the answer between two sample order
    statistics six binomial standard deviations either side of its expected rank; one pass
    over blocks (:func:`blocks`, so no whole-tensor temporary) counts the values below the
    bracket and gathers those inside it (about 1% of them), and the select runs on that band.
    When the counts show the bracket missed (or the data hold NaNs), the whole tensor is
    selected from, so the result never depends on the sample.
    """
    n = flat.numel()
    transform = torch.abs if absolute else torch.clone
    if n > 4 * _SAMPLE:
        low, high = _bracket(transform(flat[:: n // _SAMPLE]), rank, n)  # fixed: no randomness
        loops = fused_loops(flat)
        if loops is not None:  # one pass: count below and above, gather the band
            below, above, array = loops.band(
                flat.numpy(),
                -math.inf if low is None else low,
                math.inf if high is None else high,
                absolute,
            )
            return _band_statistic(
                torch.from_numpy(array), rank, int(below), int(above), flat, absolute
            )
        below = above = 0
        band = []
        for block in blocks(n):
            values = transform(flat[block])
            inside = torch.ones_like(values, dtype=torch.bool)
            if low is not None:
                lower = values < low
                below += int(torch.count_nonzero(lower))
                inside &= ~lower
            if high is not None:
                upper = values > high
                above += int(torch.count_nonzero(upper))
                inside &= ~upper
            band.append(values[inside])  # NaNs compare false both ways: they land here
        return _band_statistic(torch.cat(band), rank, below, above, flat, absolute)
    return _whole_statistic(flat, rank, absolute)


def _bracket(sample: torch.Tensor, rank: int, n: int) -> tuple[float | None, float | None]:
    """Two order statistics of ``sample`` (strided from ``n`` values; reordered in place on
    CPU) six binomial standard deviations either side of where the ``rank``-th of ``n``
    falls; None where the bracket runs past the sample's ends."""
    m = sample.numel()
    expected = rank / n * m
    spread = _BRACKET_SIGMAS * (m * (rank / n) * (1 - rank / n)) ** 0.5 + 8
    low_index, high_index = int(expected - spread), int(expected + spread)
    if sample.device.type == "cpu":  # only two order statistics: partition, no sort
        wanted = [i for i in (low_index, high_index) if 0 <= i < m]
        if wanted:
            sample.numpy().partition(wanted)
    else:
        sample = sample.sort().values
    low = float(sample[low_index]) if low_index >= 0 else None
    high = float(sample[high_index]) if high_index < m else None
    return low, high


def _magnitude_statistics(flat: torch.Tensor, ranks: tuple[int, int]) -> list[tuple[float, int]]:
    """``_order_statistic(flat, rank, absolute=True)`` for two ranks; on CPU with the fused
    loops, one pass counts and gathers both bands (breadcrumbs' two cuts)."""
    n = flat.numel()
    loops = fused_loops(flat)
    if loops is None or n <= 4 * _SAMPLE:
        return [_order_statistic(flat, rank, absolute=True) for rank in ranks]
    sample = flat[:: n // _SAMPLE].abs()  # one sample: a partition reorders, never changes it
    brackets = [_bracket(sample, rank, n) for rank in ranks]
    (low1, high1), (low2, high2) = [
        (-math.inf if low is None else low, math.inf if high is None else high)
        for low, high in brackets
    ]
    first, second = loops.band_pair(flat.numpy(), low1, high1, low2, high2)
    return [
        _band_statistic(torch.from_numpy(array), rank, int(below), int(above), flat, True)
        for rank, (below, above, array) in zip(ranks, (first, second), strict=True)
    ]


def _band_statistic(
    band: torch.Tensor, rank: int, below: int, above: int, flat: torch.Tensor, absolute: bool
) -> tuple[float, int]:
    # the band holds the answer unless the sample's bracket missed it (or there are NaNs)
    wanted = rank - below
    if 1 <= wanted <= band.numel() and not bool(torch.isnan(band).any()):
        loops = fused_loops(band)
        if loops is not None:  # a radix select: linear however many values are tied
            unsigned = np.uint32 if band.dtype == torch.float32 else np.uint64
            bits, more = loops.select(band.numpy().view(unsigned), wanted, 8 * band.itemsize)
            value = np.array([bits], dtype=np.uint64).astype(unsigned).view(band.numpy().dtype)
            return float(value[0]), above + int(more)
        threshold = _select_(band, wanted)
        return threshold, above + int(torch.count_nonzero(band > threshold))
    return _whole_statistic(flat, rank, absolute)


def _whole_statistic(flat: torch.Tensor, rank: int, absolute: bool) -> tuple[float, int]:
    values = flat.abs() if absolute else flat.clone()
    threshold = _select_(values, rank)  # both order NaN above every number
    return threshold, int(torch.count_nonzero(values > threshold))


def threshold_mask(magnitude: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """Keep the magnitudes above ``threshold`` and the first ``ties`` equal to it (by index)."""
    flat = magnitude.reshape(-1)
    keep = flat > threshold
    if ties > 0:
        tied = torch.nonzero(flat == threshold).squeeze(1)[:ties]
        keep[tied] = True
    return keep.view(magnitude.shape)


@dataclass(frozen=True)
class Cut:
    """What a magnitude top-k keeps: every ``|δ| > threshold`` and the first ``ties`` entries
    with ``|δ| == threshold`` (in flat order). ``threshold = inf`` keeps nothing."""

    threshold: float
    ties: int


def magnitude_cut(flat: torch.Tensor, k: int) -> Cut | None:
    """The :class:`Cut` of the ``k`` largest ``|δ|`` of a 1-D tensor, or None when ``k >= n``
    (everything is kept).

    The same threshold as :func:`kth_largest` on ``flat.abs()``, by the same blockwise
    selection (:func:`_order_statistic`).
    """
    n = flat.numel()
    if k >= n:
        return None
    if k <= 0:
        return Cut(float("inf"), 0)
    threshold, above = _order_statistic(flat, n - k + 1, absolute=True)
    return Cut(threshold, k - above)


def magnitude_cuts(flat: torch.Tensor, first: int, second: int) -> tuple[Cut | None, Cut | None]:
    """``(magnitude_cut(flat, first), magnitude_cut(flat, second))``, the two selections'
    passes over the data shared when both need one."""
    n = flat.numel()
    if not (0 < first < n and 0 < second < n):
        return magnitude_cut(flat, first), magnitude_cut(flat, second)
    (t1, above1), (t2, above2) = _magnitude_statistics(flat, (n - first + 1, n - second + 1))
    return Cut(t1, first - above1), Cut(t2, second - above2)


def _select_(values: torch.Tensor, rank: int) -> float:
    """The ``rank``-th smallest (1-based) of 1-D ``values``, NaN ordered above every number
    (as ``torch.kthvalue`` does), reordering CPU ``values`` in place: NumPy's introselect, which (unlike ``torch.kthvalue``) makes no copy of the
    values and no int64 index array (three times the values' memory). Other devices use
    ``kthvalue``."""
    if values.device.type != "cpu":
        return float(torch.kthvalue(values, rank).values)
    array = values.numpy()
    array.partition(rank - 1)
    return float(array[rank - 1])


def _kept_block(block: torch.Tensor, cut: Cut | None, ties_left: int) -> tuple[torch.Tensor, int]:
    """One block of a flat tensor with what ``cut`` keeps (a new tensor), and the ties still
    to keep in the blocks after it (ties go to the lowest flat indices)."""
    if cut is None:
        return block.clone(), 0
    kept = torch.nn.functional.hardshrink(block, cut.threshold)  # |δ| > threshold
    if ties_left > 0 and 0 < cut.threshold < float("inf"):  # tied zeros add nothing
        below = float(
            torch.nextafter(
                torch.tensor(cut.threshold, dtype=block.dtype),
                torch.tensor(0.0, dtype=block.dtype),
            )
        )
        tied = torch.nn.functional.hardshrink(block - kept, below)  # exactly |δ| == threshold
        count = int(torch.count_nonzero(tied))
        if count <= ties_left:
            kept += tied
            ties_left -= count
        else:
            end = _prefix_holding(tied, ties_left)
            kept[:end] += tied[:end]
            ties_left = 0
    return kept, ties_left


def keep_top_(flat: torch.Tensor, cut: Cut | None) -> None:
    """Zero, in place and block by block, every entry of 1-D ``flat`` that ``cut`` drops."""
    if cut is None:
        return
    loops = fused_loops(flat)
    if loops is not None:
        loops.keep_(flat.numpy(), cut.threshold, cut.ties, 0.0, 0, False)
        return
    ties = cut.ties
    for block in blocks(flat.numel()):
        kept, ties = _kept_block(flat[block], cut, ties)
        flat[block] = kept


def keep_between_(flat: torch.Tensor, outer: Cut | None, inner: Cut | None) -> None:
    """Keep, in place, what ``outer`` keeps and ``inner`` does not (``inner`` keeps a subset
    of ``outer``'s top entries, in the same tie order): breadcrumbs' band."""
    loops = fused_loops(flat)
    if loops is not None:  # a missing cut keeps everything: |v| > -1
        outer_cut, inner_cut = outer or Cut(-1.0, 0), inner or Cut(-1.0, 0)
        loops.keep_(
            flat.numpy(),
            outer_cut.threshold,
            outer_cut.ties,
            inner_cut.threshold,
            inner_cut.ties,
            True,
        )
        return
    outer_ties = outer.ties if outer is not None else 0
    inner_ties = inner.ties if inner is not None else 0
    for block in blocks(flat.numel()):
        kept, outer_ties = _kept_block(flat[block], outer, outer_ties)
        top, inner_ties = _kept_block(flat[block], inner, inner_ties)
        flat[block] = kept.sub_(top)


_TABLE_BUDGET = 1 << 21  # histogram cells per chunk of rows (16 MB of int64 counts)
_COMPARE_BUDGET = 1 << 22  # elements compared at once when resolving a rank exactly


def della_probability(rank: torch.Tensor, n: int, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of an entry of 0-based magnitude ``rank`` in a row of ``n``.

    ``p = (density − ε) + 2ε·rank/(n − 1)``: the smallest magnitude is kept with probability
    ``density − ε``, the largest with ``density + ε`` (MagPrune, Deep et al. 2024,
    arXiv:2406.11617; MergeKit's ``della_magprune``). A row of one entry keeps it with
    probability ``density``. Computed in float64 with this exact expression, so a reference
    reading of the formula gives the same bits.
    """
    if n == 1:
        return torch.full(rank.shape, density, dtype=torch.float64, device=rank.device)
    return (density - epsilon) + (2 * epsilon) * rank.to(torch.float64) / (n - 1)


def _average_ranks(keys: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Average 0-based rank of ``keys[rows[j], columns[j]]`` in its row, by counting.

    ``keys`` are non-negative magnitudes (or anything ordered like them)."""
    n = keys.shape[1]
    ranks = torch.empty(rows.numel(), dtype=torch.float64, device=keys.device)
    step = max(1, _COMPARE_BUDGET // n)
    for start in range(0, rows.numel(), step):
        r, c = rows[start : start + step], columns[start : start + step]
        row_keys = keys[r]  # (m, n)
        own = keys[r, c].unsqueeze(1)
        below = (row_keys < own).sum(dim=1)
        equal = (row_keys == own).sum(dim=1)
        ranks[start : start + step] = below + (equal - 1) / 2
    return ranks


def della_mask(
    magnitude: torch.Tensor, density: float, epsilon: float, uniform: torch.Tensor
) -> torch.Tensor:
    """DELLA's keep mask: entry ``j`` of a row is kept when ``uniform[j] < p(rank_j)``.

    ``magnitude`` and ``uniform`` are ``(rows, n)``; ``rank_j`` is the 0-based rank of
    ``|δ_j|`` in its row in ascending order, equal magnitudes sharing the average of their
    ranks (so the mask does not depend on where equal values sit), and ``p`` is
    :func:`della_probability`. Nothing is sorted: a per-row histogram of the magnitudes' bit
    patterns (a non-negative float's bits order like its value), about two buckets per entry
    between the row's smallest and largest, gives each entry its bucket's rank span
    ``[lo, hi]``. A bucket holding one value (often a single entry, or the
    many equal deltas of bfloat16 models) gives the exact rank ``(lo + hi)/2``; elsewhere
    ``uniform < p(lo)`` keeps and ``uniform ≥ p(hi)`` drops for certain, and only the rare
    entries whose draw falls between get their exact rank by counting over the row. The
    result is what exact ranks give, in O(n) expected time.
    """
    if magnitude.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"della ranks float32 or float64 magnitudes, not {magnitude.dtype}")
    rows, n = magnitude.shape
    mask = torch.empty_like(magnitude, dtype=torch.bool)
    # buckets come from float32 bits (rounding keeps the order; the int32 range keeps the
    # arithmetic below exact), the exact keys decide within a bucket
    bits = magnitude.to(torch.float32).view(torch.int32).to(torch.int64)
    bins = max(64, 2 * n)  # about two buckets per entry: O(n) work per row
    chunk = max(1, _TABLE_BUDGET // (bins + 1))
    for first in range(0, rows, chunk):
        part = magnitude[first : first + chunk]
        pattern = bits[first : first + chunk]
        zero = pattern == 0
        # nonzero magnitudes spread over buckets 1..bins, linearly in their bit pattern (so
        # about uniformly in log-magnitude between the row's smallest and largest); zeros,
        # the smallest value, get bucket 0 to themselves
        lowest = torch.where(zero, torch.iinfo(torch.int32).max, pattern).amin(dim=1, keepdim=True)
        span = (pattern.amax(dim=1, keepdim=True) - lowest).clamp_(min=0) + 1
        bucket = ((pattern - lowest).clamp_(min=0) * bins).div_(span, rounding_mode="floor")
        bucket = torch.where(zero, 0, bucket.add_(1).clamp_(max=bins))
        shape = (part.shape[0], bins + 1)
        counts = torch.zeros(shape, dtype=torch.int64, device=part.device)
        counts.scatter_add_(1, bucket, torch.ones_like(bucket))
        smallest = torch.full(shape, torch.inf, dtype=part.dtype, device=part.device)
        largest = torch.full(shape, -1.0, dtype=part.dtype, device=part.device)
        smallest.scatter_reduce_(1, bucket, part, "amin")
        largest.scatter_reduce_(1, bucket, part, "amax")
        low = (torch.cumsum(counts, dim=1) - counts).gather(1, bucket)
        high = low + counts.gather(1, bucket) - 1
        single = smallest.gather(1, bucket) == largest.gather(1, bucket)
        draws = uniform[first : first + chunk].to(torch.float64)
        exact = (low + high) / 2  # right where the bucket holds one value
        keep = draws < della_probability(torch.where(single, exact, low), n, density, epsilon)
        unsure = ~single & (keep ^ (draws < della_probability(high, n, density, epsilon)))
        if bool(unsure.any()):
            r, c = unsure.nonzero(as_tuple=True)
            ranks = _average_ranks(part, r, c)
            keep[r, c] = draws[r, c] < della_probability(ranks, n, density, epsilon)
        mask[first : first + chunk] = keep
    return mask


def sparsify(
    delta: torch.Tensor,
    method: Sparsifier,
    *,
    density: float,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    rescale: Rescale = "none",
    model_threshold: tuple[float, int] | None = None,
) -> torch.Tensor:
    """Sparsify step: keep a ``density`` fraction of one task vector.

    - ``magnitude``: keep the ``max(1, int(density·N))`` largest ``|δ|`` (TIES trim);
    - ``breadcrumbs``: with ``target = int(density·N)`` and ``n_top = int(gamma·N)``, drop the
      ``n_top`` largest and the ``N − target − n_top`` smallest, keeping exactly ``target``
      (MergeKit up to 0.1.4 kept nothing when ``gamma·N < 1``);
    - ``random``: keep each element with probability ``density`` (DARE), drawn from
      ``generator``;
    - ``della``: keep each element with probability ``density − ε`` (smallest magnitude of
      its row) to ``density + ε`` (largest), linear in its rank (:func:`della_mask`); a 1-D
      tensor is one row, a tensor of more dimensions is ranked along its flattened dims 1..;
    - ``none``: unchanged.

    ``rescale`` then scales the kept values: ``inverse`` by ``1/density`` (the DARE paper),
    ``l1`` so the L1 norm is unchanged (MergeKit's rule, skipped below 1e-7), ``none``.
    ``density >= 1`` returns ``delta`` unchanged; ``density <= 0`` gives zeros.

    Args:
        delta: one task vector, any shape.
        method: ``none``, ``magnitude``, ``random`` or ``breadcrumbs``.
        density: fraction of elements kept, in [0, 1].
        gamma: breadcrumbs' fraction of largest elements dropped (default 0.01).
        epsilon: della's half-width of keep probabilities around ``density`` (default 0.15);
            ``0 < density − ε`` and ``density + ε < 1`` are required for ``0 < density < 1``.
        generator: random source for ``random`` and ``della``.
        rescale: ``none`` (default), ``l1`` or ``inverse``.
        model_threshold: for ``magnitude`` with model-wide top-k (:mod:`alloykit.prepass`):
            keep what is above this threshold and this many of the entries equal to it.

    Returns:
        A new tensor of ``delta``'s shape.

    Example:
        >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), "magnitude", density=0.5)
        tensor([ 0., -3.,  2.,  0.])
    """
    return sparsify_(
        delta.clone(),
        method,
        density=density,
        gamma=gamma,
        epsilon=epsilon,
        generator=generator,
        rescale=rescale,
        model_threshold=model_threshold,
    )


def sparsify_(
    delta: torch.Tensor,
    method: Sparsifier,
    *,
    density: float,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    rescale: Rescale = "none",
    model_threshold: tuple[float, int] | None = None,
) -> torch.Tensor:
    """:func:`sparsify` in place: zeroes the dropped entries of ``delta`` and rescales the
    rest, returning ``delta``. Works block by block (:func:`blocks`, rows for della): its
    temporaries are a few blocks, never a copy of the task vector; random draws are taken in
    flat order, so they are the draws one whole-tensor call would take."""
    if method == "none" or density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if not delta.is_contiguous():  # work on a contiguous copy (views below must alias it)
        return delta.copy_(
            sparsify_(
                delta.contiguous(),
                method,
                density=density,
                gamma=gamma,
                epsilon=epsilon,
                generator=generator,
                rescale=rescale,
                model_threshold=model_threshold,
            )
        )
    flat = delta.view(-1)
    n = flat.numel()
    before = stable_abs_sum(flat) if rescale == "l1" else 0.0
    if method == "magnitude":
        if model_threshold is not None:
            cut: Cut | None = Cut(model_threshold[0], model_threshold[1])
        else:
            cut = magnitude_cut(flat, max(1, int(density * n)))
        keep_top_(flat, cut)
    elif method == "breadcrumbs":
        target, n_top = int(density * n), int(gamma * n)
        n_bottom = n - target - n_top
        if n_bottom < 0:
            n_top, n_bottom = n_top + n_bottom, 0
        # the top n_top entries are a subset of the top n − n_bottom (same tie order)
        outer, inner = magnitude_cuts(flat, n - n_bottom, n_top)
        keep_between_(flat, outer, inner)
    elif method == "random":
        key = draw_key(generator, delta.device)
        loops = fused_loops(flat)
        if loops is not None:
            loops.random_keep_(flat.numpy(), key, density)
        else:
            limit = float(torch.tensor(density, dtype=torch.float32))
            for block in blocks(n):
                part = flat[block]
                draws = counter_uniform(key, block.start, part.numel(), delta.device)
                # keep where draw < density (float32), as a 0/1 float: sign(density − draw)
                # is +1 exactly when draw < density (no rounding flips a sign), then clamp
                part.mul_(draws.neg_().add_(limit).sign_().clamp_(min=0.0))
    elif method == "della":
        problem = della_bounds_problem(density, epsilon)
        if problem:
            raise ValueError(problem)
        if rescale == "inverse":
            raise ValueError(INVERSE_DELLA)
        rows = delta.view(1, -1) if delta.dim() < 2 else delta.view(delta.shape[0], -1)
        key = draw_key(generator, delta.device)
        loops = fused_loops(delta)
        if loops is not None:  # all rows in one call: its buffers are a row per thread
            loops.della_keep_(rows.numpy(), key, 0, density, epsilon)
        else:
            # a quarter block of rows: della_mask's histograms take ~20 bytes per entry
            step = max(1, _block_size(n) // (4 * max(1, rows.shape[1])))
            for first in range(0, rows.shape[0], step):
                part = rows[first : first + step]
                draws = counter_uniform(key, first * rows.shape[1], part.numel(), delta.device)
                part.mul_(della_mask(part.abs(), density, epsilon, draws.view(part.shape)))
    else:
        raise ValueError(f"unknown sparsify method {method!r}")
    if rescale == "inverse":  # the DARE paper's 1/(1−p), p the drop rate
        delta.div_(density)
    elif rescale == "l1":  # MergeKit: match the L1 norm of the whole task vector
        after = stable_abs_sum(flat)
        if before > RESCALE_EPSILON and after > RESCALE_EPSILON:
            delta.mul_(before / after)
    return delta


def draw_key(generator: torch.Generator | None, device: torch.device) -> int:
    """One 63-bit key from ``generator``: the seed of one task vector's counter-based draws
    (:func:`counter_uniform`)."""
    if generator is not None:
        device = generator.device
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))


_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    # a 64-bit pattern as the int64 torch holds it
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # logical shift of int64 bit patterns (torch's >> is arithmetic)
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(key: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Draws ``start .. start + count − 1`` of ``key``: float32 uniforms in [0, 1) on a 2^-24
    grid, each a function of the key and its index alone.

    SplitMix64's output function (Steele, Lea & Flood 2014, "Fast splittable pseudorandom
    number generators") applied to ``key + (⌊index/2⌋ + 1)·0x9E3779B97F4A7C15``: bits 40-63
    of the 64-bit result for an even index, bits 16-39 for the odd one (one mix, two draws).
    Counter-based draws need no sequential stream: any block of a tensor, on any thread or
    device, draws exactly what a whole-tensor pass would, so DARE's and DELLA's masks are
    the same bits on every device and thread count. On CPU the fused loops
    (:mod:`alloykit.methods._loops`) compute the same function; this is the torch form.
    """
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    odd = (index & 1).bool()
    z = (index >> 1).add_(1).mul_(_GOLDEN).add_(_signed(key & _MASK64))
    z = (z ^ _shift_right(z, 30)).mul_(_MIX1)
    z = (z ^ _shift_right(z, 27)).mul_(_MIX2)
    z = z ^ _shift_right(z, 31)
    bits = torch.where(odd, _shift_right(z, 16) & ((1 << 24) - 1), _shift_right(z, 40))
    return bits.to(torch.float32).mul_(1.0 / (1 << 24))


INVERSE_DELLA = (
    "rescale_mode: inverse divides by one keep probability (DARE); della's differ per entry, "
    "so della rescales by the L1 norm (rescale_mode: l1)"
)


def della_bounds_problem(density: float, epsilon: float) -> str | None:
    """Why ``density ± epsilon`` is not a probability range for DELLA, or None when it is.

    Checked only for ``0 < density < 1`` (density 0 keeps nothing, 1 everything), as in
    MergeKit, whose message this mirrors.
    """
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return (
            f"epsilon {epsilon:g} with density {density:g}: density ± epsilon must lie inside "
            "(0, 1); lower epsilon or move density away from 0 and 1"
        )
    return None


def elected_signs(weighted: torch.Tensor, method: Election) -> torch.Tensor:
    """The sign each entry elects, ``±1`` (a zero total elects ``+``), of ``weighted[0]``'s shape.

    ``mass``: the sign of ``Σ_i u_i`` (TIES; MergeKit's ``sum``); ``count``: the sign of
    ``Σ_i sign(u_i)`` (PEFT's alternative). Rows are added in index order, so the vote does
    not depend on the thread count.
    """
    if method not in ("mass", "count"):
        raise ValueError(f"unknown elect method {method!r}")
    if method == "mass":
        total = sum_in_order(weighted)
    else:
        total = torch.sign(weighted[0])
        for row in weighted[1:]:
            total += torch.sign(row)  # small integers: exact
    return torch.sign(total).add_(0.5).sign_()  # 0 -> +1


def agreement(
    row: torch.Tensor, signs: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """1.0 where ``row`` has the elected sign, 0.0 elsewhere (zero entries have no sign).

    A float 0/1 factor rather than a boolean mask: multiplying by it (``addcmul_``) runs at
    the speed of any elementwise op, applying a boolean mask several times slower.
    """
    return torch.sign(row, out=out).mul_(signs).clamp_(min=0.0)


def elect(weighted: torch.Tensor, method: Election) -> torch.Tensor:
    """Elect step: which models' entries agree with the elected sign, ``(k, *shape)`` bool.

    ``mass``: the sign of ``Σ_i u_i`` (TIES; MergeKit's ``sum``); ``count``: the sign of
    ``Σ_i sign(u_i)`` (PEFT's alternative); a zero total elects ``+``. An entry equal to zero
    has no sign and never agrees. ``none``: every entry agrees. (The merge itself uses
    :func:`elected_signs` and :func:`agreement` one model at a time.)

    Example:
        >>> elect(torch.tensor([[1.0, -1.0], [-3.0, -1.0], [1.0, 2.0]]), "count").tolist()
        [[True, True], [False, True], [True, False]]
    """
    if method == "none":
        return torch.ones_like(weighted, dtype=torch.bool)
    signs = elected_signs(weighted, method)
    return torch.stack([agreement(row, signs) > 0 for row in weighted])


def combine(
    weighted: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    method: Combination,
    normalize: bool,
    scale: float = 1.0,
    signs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine step: ``λ·Σ_i m_i·u_i``, divided as ``method`` and ``normalize`` say.

    ``sum`` with ``normalize``: divide by ``Σ_i m_i·w_i`` elementwise, a zero divisor counting
    as 1 (TIES, MergeKit); without a mask (no election) by ``Σ_i w_i``, unless its magnitude is
    below 1e-8. ``mean``: divide by the number of agreeing models (at least 1); ``normalize``
    does not apply.

    Args:
        weighted: ``(k, *shape)``: ``u_i = w_i·δ_i`` after sparsification.
        mask: ``(k, *shape)`` bool from :func:`elect`, or None when nothing was elected.
        weights: ``(k,)`` the weights ``w_i``.
        method: ``sum`` or ``mean``.
        normalize: for ``sum``, divide by the (agreeing) weights' sum.
        scale: λ (default 1.0).
        signs: instead of ``mask``, the elected signs (:func:`elected_signs`): each model's
            agreement is then computed as it is added, so no ``(k, *shape)`` mask exists.

    Example:
        >>> u = torch.tensor([[2.0, 1.0], [4.0, -1.0]])
        >>> combine(u, None, torch.tensor([1.0, 1.0]), method="mean", normalize=False)
        tensor([3., 0.])
    """
    if method not in ("sum", "mean"):
        raise ValueError(f"unknown combine method {method!r}")
    if mask is not None and signs is not None:
        raise ValueError("combine: give a mask or the elected signs, not both")
    elected = mask is not None or signs is not None
    out = torch.zeros_like(weighted[0])
    factor = torch.empty_like(out) if elected else None
    # the number (mean) or weight (normalized sum) of agreeing models per entry
    divisor = torch.zeros_like(out) if elected and (method == "mean" or normalize) else None
    for i in range(weighted.shape[0]):  # fixed order: the result does not depend on threads
        if factor is None:
            out += weighted[i]
            continue
        if mask is not None:
            factor.copy_(mask[i])
        else:
            assert signs is not None
            agreement(weighted[i], signs, out=factor)
        out.addcmul_(weighted[i], factor)
        if divisor is not None:
            divisor.add_(factor, alpha=1.0 if method == "mean" else float(weights[i]))
    if method == "mean":
        out /= weighted.shape[0] if divisor is None else divisor.clamp_(min=1)
    elif normalize:
        if divisor is None:
            total = float(weights.sum())
            if abs(total) >= ZERO_WEIGHT_SUM:
                out /= total
        else:
            out /= torch.where(divisor == 0, 1.0, divisor)
    if scale != 1.0:
        out *= scale
    return out


def normalize_deltas(deltas: torch.Tensor, norm: DeltaNorm) -> torch.Tensor:
    """Scale each task vector to the mean of their norms (``l1`` or ``l2``), in place.

    For task vectors of very different sizes (a long and a short fine-tune), so that one does
    not drown the others; the overall size, the mean norm, is kept. A zero vector stays zero.
    """
    if norm == "none":
        return deltas
    if norm not in ("l1", "l2"):
        raise ValueError(f"unknown delta_norm {norm!r}")
    norms = [
        stable_abs_sum(d.reshape(-1)) if norm == "l1" else stable_square_sum(d.reshape(-1)) ** 0.5
        for d in deltas
    ]
    mean = sum(norms) / len(norms)
    for delta, size in zip(deltas, norms, strict=True):
        if size > 0:
            delta.mul_(mean / size)
    return deltas


def merge_task_vectors(
    base: torch.Tensor,
    tensors: torch.Tensor,
    weights: torch.Tensor,
    densities: torch.Tensor | None = None,
    *,
    sparsify: Sparsifier = "none",
    elect: Election = "none",
    combine: Combination = "sum",
    normalize: bool = False,
    scale: float = 1.0,
    rescale: Rescale = "none",
    gammas: torch.Tensor | None = None,
    delta_norm: DeltaNorm = "none",
    generator: torch.Generator | None = None,
    epsilons: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole task-vector merge: ``base + combine(elect(w·sparsify(δ)))``.

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)``: the fine-tuned models' tensors.
        weights: ``(k,)`` per-model weights.
        densities: ``(k,)`` per-model densities (default all 1).
        sparsify, elect, combine: the steps (see :func:`sparsify`, :func:`elect`,
            :func:`combine`).
        normalize, scale: combine's options (λ = ``scale``).
        rescale: how sparsify rescales the kept values.
        gammas: ``(k,)`` breadcrumbs' per-model gamma (default 0.01).
        delta_norm: scale task vectors to a common norm first (``none``, ``l1``, ``l2``).
        generator: random source for ``random`` and ``della`` sparsification.
        epsilons: ``(k,)`` della's per-model epsilon (default 0.15).

    Returns:
        The merged tensor (new; the arguments are not modified).

    Example:
        >>> base = torch.zeros(3)
        >>> tuned = torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 0.0]])
        >>> merge_task_vectors(base, tuned, torch.ones(2), elect="mass", normalize=True)
        tensor([ 1.0000, -2.0000,  0.5000])
    """
    deltas = tensors - base  # (k, *shape): one task vector per model
    steps = Steps(sparsify, elect, combine, normalize, scale, rescale, delta_norm)
    return merge_deltas(deltas, weights, steps, densities, gammas, generator, epsilons).add_(base)


_ELECT_CODE = {"none": 0, "mass": 1, "count": 2}  # the fused loop's election codes


@dataclass(frozen=True)
class Steps:
    """The steps of a task-vector merge and their global options (see merge_task_vectors)."""

    sparsify: Sparsifier = "none"
    elect: Election = "none"
    combine: Combination = "sum"
    normalize: bool = False
    scale: float = 1.0
    rescale: Rescale = "none"
    delta_norm: DeltaNorm = "none"


def merge_deltas(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    steps: Steps,
    densities: torch.Tensor | None = None,
    gammas: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    epsilons: torch.Tensor | None = None,
    model_thresholds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`merge_task_vectors` on task vectors already taken; **overwrites** ``deltas``.

    For callers that own their ``(k, *shape)`` buffer (the executor), which saves one copy of
    it; returns the combined task vector (without the base). ``model_thresholds`` holds, per
    model, the threshold and tie quota of model-wide top-k (:mod:`alloykit.prepass`).
    """
    sparsify_deltas(deltas, steps, densities, gammas, generator, epsilons, model_thresholds)
    k = deltas.shape[0]
    loops = fused_loops(deltas)
    if loops is not None and steps.elect in _ELECT_CODE and steps.combine in ("sum", "mean"):
        # the result goes into the first task vector's row: each tile of it is written after
        # every row of that tile was read, and a fresh tensor would be faulted in page by page
        out = deltas[0]
        loops.elect_combine(
            deltas.view(k, -1).numpy(),
            weights.to(torch.float64).numpy(),
            _ELECT_CODE[steps.elect],
            steps.combine == "mean",
            steps.normalize,
            float(weights.sum()),
            float(steps.scale),
            out.view(-1).numpy(),
        )
        return out
    for i in range(k):
        deltas[i] *= float(weights[i])
    # elect and combine are elementwise: run them block by block, so their temporaries (the
    # signs, the agreement factors, the divisor) are blocks, not whole tensors
    flat = deltas.reshape(k, -1)
    out = torch.empty(flat.shape[1:], dtype=deltas.dtype, device=deltas.device)
    for block in blocks(flat.shape[1]):
        part = flat[:, block]
        signs = None if steps.elect == "none" else elected_signs(part, steps.elect)
        out[block] = combine(
            part,
            None,
            weights,
            method=steps.combine,
            normalize=steps.normalize,
            scale=steps.scale,
            signs=signs,
        )
    return out.view(deltas.shape[1:])


def sparsify_deltas(
    deltas: torch.Tensor,
    steps: Steps,
    densities: torch.Tensor | None = None,
    gammas: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    epsilons: torch.Tensor | None = None,
    model_thresholds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The steps before weighting, in place on ``deltas`` ``(k, *shape)``: ``delta_norm``, then
    sparsify each task vector (drawing from ``generator`` in model order). Returns ``deltas``."""
    normalize_deltas(deltas, steps.delta_norm)
    if steps.sparsify != "none":
        for i in range(deltas.shape[0]):
            density = 1.0 if densities is None else float(densities[i])
            gamma = 0.01 if gammas is None else float(gammas[i])
            epsilon = 0.15 if epsilons is None else float(epsilons[i])
            threshold = None
            if model_thresholds is not None:
                threshold = (float(model_thresholds[0][i]), int(model_thresholds[1][i]))
            sparsify_(
                deltas[i],
                steps.sparsify,
                density=density,
                gamma=gamma,
                epsilon=epsilon,
                generator=generator,
                rescale=steps.rescale,
                model_threshold=threshold,
            )
    return deltas


def task_arithmetic(
    base: torch.Tensor,
    tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    normalize: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """Task arithmetic: ``base + λ·Σ_i w_i (x_i − base)`` (``/ Σ w_i`` when ``normalize``).

    Ilharco et al. 2023, arXiv:2212.04089. A negative weight negates a task vector (the
    paper's "forgetting via negation"). The three steps with nothing sparsified or elected.

    Example:
        >>> b = torch.zeros(2)
        >>> task_arithmetic(b, torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([1.0, -1.0]))
        tensor([-1.,  1.])
    """
    return merge_task_vectors(base, tensors, weights, normalize=normalize, scale=scale)
