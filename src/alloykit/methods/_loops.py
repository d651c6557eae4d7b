"""Fused CPU loops (numba) for the task-vector steps' hot passes.

The torch code in :mod:`alloykit.methods.task_vectors` is the definition and runs on every
device; on CPU these loops do the same work in one pass over the data instead of a chain of
elementwise torch ops (each of which reads and writes the whole block, and a boolean gather
costs 5-10x an elementwise op). Each loop gives the torch path's result exactly (selection
counts, kept entries, tie order); the sums of the combine step add the models in the same
index order. Tests compare the two paths (tests/methods/test_loops.py).

Work is split into fixed chunks of :data:`CHUNK` elements, so results never depend on the
thread count: chunks are counted in parallel, their counts added in chunk order, and each
chunk then knows exactly where its output goes or how many tied entries come before it.

This module imports numba, which takes a few tenths of a second: it is imported on the first
merge that needs it (:func:`alloykit.methods.task_vectors.fused_loops`), never by ``import
alloykit`` or ``alloykit --help``. Compiled code is cached next to this file (numba's
``cache=True``), so only the first merge after installing pays the compilation.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

CHUNK = 1 << 16  # elements per chunk of parallel work


@njit(inline="always", cache=True, nogil=True)
def _chunk_count(n):  # type: ignore[no-untyped-def]
    return (n + CHUNK - 1) // CHUNK


def use_threads(count: int) -> None:
    """Run the loops on ``count`` threads (torch's count: ``--threads``), at most numba's."""
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


@njit(parallel=True, cache=True, nogil=True)
def band(values, low, high, absolute):  # type: ignore[no-untyped-def]
    """Count the (absolute, when ``absolute``) values below ``low`` and above ``high``, and
    gather the rest (NaNs included: they compare false both ways) in flat order.

    Returns ``(below, above, band)``; ``low = -inf`` / ``high = inf`` for no bound."""
    n = values.size
    chunks = _chunk_count(n)
    below = np.zeros(chunks, np.int64)
    above = np.zeros(chunks, np.int64)
    # each chunk works on a slice, with the absolute/signed case outside its loops: a loop
    # over values[j] testing `absolute` inside ran at half the speed
    for c in prange(chunks):
        part = values[c * CHUNK : min(n, (c + 1) * CHUNK)]
        lo_count = 0
        hi_count = 0
        if absolute:
            for j in range(part.size):
                v = abs(part[j])
                lo_count += v < low  # no branches: the comparisons are coin flips near a median
                hi_count += v > high
        else:
            for j in range(part.size):
                v = part[j]
                lo_count += v < low
                hi_count += v > high
        below[c] = lo_count
        above[c] = hi_count
    starts = np.zeros(chunks + 1, np.int64)
    for c in range(chunks):
        size = min(n, (c + 1) * CHUNK) - c * CHUNK
        starts[c + 1] = starts[c] + size - below[c] - above[c]
    # every value is written and the position advances only past those inside: no branch
    # (a branch on the comparisons costs ~6 ns a value), one spare slot per chunk
    spare = np.empty(starts[chunks] + chunks, values.dtype)
    for c in prange(chunks):
        part = values[c * CHUNK : min(n, (c + 1) * CHUNK)]
        at = starts[c] + c
        if absolute:
            for j in range(part.size):
                v = abs(part[j])
                spare[at] = v
                at += not ((v < low) | (v > high))
        else:
            for j in range(part.size):
                v = part[j]
                spare[at] = v
                at += not ((v < low) | (v > high))
    out = np.empty(starts[chunks], values.dtype)
    for c in range(chunks):
        out[starts[c] : starts[c + 1]] = spare[starts[c] + c : starts[c + 1] + c]
    return below.sum(), above.sum(), out


@njit(parallel=True, cache=True, nogil=True)
def band_pair(values, low1, high1, low2, high2):  # type: ignore[no-untyped-def]
    """:func:`band` of the absolute values for two brackets at once (breadcrumbs' two cuts):
    one counting pass and one gathering pass instead of two of each.

    Returns ``((below, above, band), (below, above, band))``."""
    n = values.size
    chunks = _chunk_count(n)
    counts = np.zeros((4, chunks), np.int64)
    for c in prange(chunks):
        part = values[c * CHUNK : min(n, (c + 1) * CHUNK)]
        b1 = 0
        a1 = 0
        b2 = 0
        a2 = 0
        for j in range(part.size):
            v = abs(part[j])
            b1 += v < low1
            a1 += v > high1
            b2 += v < low2
            a2 += v > high2
        counts[0, c] = b1
        counts[1, c] = a1
        counts[2, c] = b2
        counts[3, c] = a2
    starts1 = np.zeros(chunks + 1, np.int64)
    starts2 = np.zeros(chunks + 1, np.int64)
    for c in range(chunks):
        size = min(n, (c + 1) * CHUNK) - c * CHUNK
        starts1[c + 1] = starts1[c] + size - counts[0, c] - counts[1, c]
        starts2[c + 1] = starts2[c] + size - counts[2, c] - counts[3, c]
    spare1 = np.empty(starts1[chunks] + chunks, values.dtype)
    spare2 = np.empty(starts2[chunks] + chunks, values.dtype)
    for c in prange(chunks):
        part = values[c * CHUNK : min(n, (c + 1) * CHUNK)]
        at1 = starts1[c] + c
        at2 = starts2[c] + c
        for j in range(part.size):
            v = abs(part[j])
            spare1[at1] = v
            at1 += not ((v < low1) | (v > high1))
            spare2[at2] = v
            at2 += not ((v < low2) | (v > high2))
    out1 = np.empty(starts1[chunks], values.dtype)
    out2 = np.empty(starts2[chunks], values.dtype)
    for c in range(chunks):
        out1[starts1[c] : starts1[c + 1]] = spare1[starts1[c] + c : starts1[c + 1] + c]
        out2[starts2[c] : starts2[c + 1]] = spare2[starts2[c] + c : starts2[c + 1] + c]
    first = (counts[0].sum(), counts[1].sum(), out1)
    second = (counts[2].sum(), counts[3].sum(), out2)
    return first, second


@njit(parallel=True, cache=True, nogil=True)
def _tie_counts(values, threshold, ties):  # type: ignore[no-untyped-def]
    # per chunk, how many entries have |v| == threshold (none counted when ties do not matter)
    n = values.size
    chunks = _chunk_count(n)
    counts = np.zeros(chunks, np.int64)
    if not _tied(threshold, ties):
        return counts
    for c in prange(chunks):
        part = values[c * CHUNK : min(n, (c + 1) * CHUNK)]
        count = 0
        for j in range(part.size):
            count += abs(part[j]) == threshold  # branch-free: the compiler vectorises it
        counts[c] = count
    return counts


@njit(cache=True, nogil=True)
def _tied(threshold, ties):  # type: ignore[no-untyped-def]
    # tied entries matter only for a finite positive threshold (tied zeros add nothing)
    return ties > 0 and 0.0 < threshold < np.inf


@njit(cache=True, nogil=True)
def _before(counts):  # type: ignore[no-untyped-def]
    # exclusive prefix sums in chunk order: the tied entries before each chunk
    before = np.zeros(counts.size, np.int64)
    for c in range(1, counts.size):
        before[c] = before[c - 1] + counts[c - 1]
    return before


@njit(parallel=True, cache=True, nogil=True)
def keep_(values, threshold, ties, inner_threshold, inner_ties, has_inner):  # type: ignore[no-untyped-def]
    """Zero in place what a magnitude cut drops: keep ``|v| > threshold`` and the first
    ``ties`` entries with ``|v| == threshold`` (flat order). With ``has_inner``, keep only
    what the outer cut keeps and the inner cut does not (breadcrumbs' band).

    The tied entries are counted per chunk first; a chunk then keeps all of its tied entries
    or none of them, except the (at most one per cut) chunk where the quota runs out, so every
    other chunk runs a branch-free select the compiler vectorises."""
    n = values.size
    chunks = _chunk_count(n)
    outer_counts = _tie_counts(values, threshold, ties)
    inner_counts = _tie_counts(values, inner_threshold, inner_ties if has_inner else 0)
    outer_before = _before(outer_counts)
    inner_before = _before(inner_counts)
    for c in prange(chunks):
        lo = c * CHUNK
        hi = min(n, (c + 1) * CHUNK)
        outer_all = outer_before[c] + outer_counts[c] <= ties  # every tie of the chunk kept
        inner_all = inner_before[c] + inner_counts[c] <= inner_ties
        outer_split = outer_counts[c] > 0 and not outer_all and outer_before[c] < ties
        inner_split = inner_counts[c] > 0 and not inner_all and inner_before[c] < inner_ties
        if not (outer_split or inner_split):
            outer_ge = outer_counts[c] > 0 and outer_all
            inner_ge = inner_counts[c] > 0 and inner_all
            part = values[lo:hi]
            if not has_inner:
                if outer_ge:
                    for j in range(part.size):
                        v = part[j]
                        part[j] = v if abs(v) >= threshold else 0.0
                else:
                    for j in range(part.size):
                        v = part[j]
                        part[j] = v if abs(v) > threshold else 0.0
            else:
                for j in range(part.size):
                    v = part[j]
                    a = abs(v)
                    keep = (a > threshold) | (outer_ge & (a == threshold))
                    top = (a > inner_threshold) | (inner_ge & (a == inner_threshold))
                    part[j] = v if keep & (not top) else 0.0
            continue
        # the chunk where a quota runs out: entry by entry (branch-free: the comparisons are
        # coin flips near the threshold)
        seen = outer_before[c]
        inner_seen = inner_before[c]
        outer_tied = outer_counts[c] > 0
        inner_tied = inner_counts[c] > 0
        for j in range(lo, hi):
            v = values[j]
            a = abs(v)
            tie = outer_tied & (a == threshold)
            keep = (a > threshold) | (tie & (seen < ties))
            seen += tie
            if has_inner:
                inner_tie = inner_tied & (a == inner_threshold)
                top = (a > inner_threshold) | (inner_tie & (inner_seen < inner_ties))
                inner_seen += inner_tie
                keep = keep & (not top)
            values[j] = v if keep else 0.0


_TILE = 512  # entries per tile of elect_combine: loops over a tile run model by model


@njit(parallel=True, cache=True, nogil=True)
def elect_combine(deltas, weights, elect, mean, normalize, weight_sum, scale, out):  # type: ignore[no-untyped-def]
    """Weight, elect and combine ``(k, n)`` task vectors into ``out`` ``(n,)``.

    ``u_i = w_i·δ_i`` in the deltas' precision. ``elect``: 0 none, 1 mass (the sign of
    ``Σ u_i``), 2 count (the sign of ``Σ sign(u_i)``); a zero total elects +. An entry agrees
    when its sign is the elected one (zero never agrees). Agreeing entries are added in model
    order; ``mean`` divides by the number agreeing (at least 1; by k without election);
    ``normalize`` by the agreeing weights' sum (a zero sum counts as 1), without election by
    ``weight_sum`` unless it is below 1e-8; then ``scale`` multiplies. Each chunk runs in
    tiles, model by model over a tile, so the inner loops are branch-free and vectorised.
    ``out`` may be the first row of ``deltas``: a tile is written after all of it was read."""
    k, n = deltas.shape
    chunks = _chunk_count(n)
    dtype = deltas.dtype.type
    zero = dtype(0.0)
    one = dtype(1.0)
    w = weights.astype(deltas.dtype)
    s = dtype(scale)
    total = dtype(weight_sum)
    divide_total = normalize and abs(weight_sum) >= 1e-8
    for c in prange(chunks):
        vote = np.empty(_TILE, deltas.dtype)
        acc = np.empty(_TILE, deltas.dtype)
        divisor = np.empty(_TILE, deltas.dtype)
        end = min(n, (c + 1) * CHUNK)
        for start in range(c * CHUNK, end, _TILE):
            m = min(_TILE, end - start)
            acc[:m] = zero
            # each inner loop is branch-free over a tile (the cases are split outside it), so
            # the compiler vectorises it: 2.3x faster than one loop testing the cases inside
            if elect == 0:
                for i in range(k):
                    wi = w[i]
                    row = deltas[i, start : start + m]
                    for t in range(m):
                        acc[t] += row[t] * wi
            else:
                vote[:m] = zero
                divisor[:m] = zero
                for i in range(k):
                    wi = w[i]
                    row = deltas[i, start : start + m]
                    if elect == 1:
                        for t in range(m):
                            vote[t] += row[t] * wi
                    else:
                        for t in range(m):
                            u = row[t] * wi
                            vote[t] += (one if u > 0 else zero) - (one if u < 0 else zero)
                for i in range(k):
                    wi = w[i]
                    add = one if mean else wi
                    row = deltas[i, start : start + m]
                    for t in range(m):
                        u = row[t] * wi
                        positive = not (vote[t] < 0)
                        agree = ((u > 0) & positive) | ((u < 0) & (not positive))
                        acc[t] += u if agree else zero
                        divisor[t] += add if agree else zero
            if elect == 0:
                if mean:
                    for t in range(m):
                        acc[t] = acc[t] / dtype(k)
                elif divide_total:
                    for t in range(m):
                        acc[t] = acc[t] / total
            elif mean:
                for t in range(m):
                    acc[t] = acc[t] / max(divisor[t], one)
            elif normalize:
                for t in range(m):
                    d = divisor[t]
                    acc[t] = acc[t] / (d if d != 0 else one)
            if scale != 1.0:
                for t in range(m):
                    out[start + t] = acc[t] * s
            else:
                out[start : start + m] = acc[:m]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ONE = np.uint64(1)
_UNIT = np.float32(1.0 / (1 << 24))
_LOW24 = np.uint64((1 << 24) - 1)


@njit(inline="always", cache=True, nogil=True)
def _mix(key, counter):  # type: ignore[no-untyped-def]
    # SplitMix64's output function (Steele, Lea & Flood 2014) of key + (counter + 1)·golden
    z = key + (np.uint64(counter) + _ONE) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always", cache=True, nogil=True)
def _unit(bits):  # type: ignore[no-untyped-def]
    # 24 bits to a float32 in [0, 1), through int64: a uint64 converts by a slow sequence
    return np.float32(np.int64(bits)) * _UNIT


@njit(inline="always", cache=True, nogil=True)
def _draw_bits(key, index):  # type: ignore[no-untyped-def]
    # the 24-bit integer u of draw `index` (the draw is u·2^-24): one 64-bit mix serves two
    # draws, bits 40-63 (even) and 16-39 (odd)
    z = _mix(key, index >> 1)
    return np.int64(z >> np.uint64(40) if index % 2 == 0 else (z >> np.uint64(16)) & _LOW24)


@njit(inline="always", cache=True, nogil=True)
def _uniform(key, index):  # type: ignore[no-untyped-def]
    # draw `index` as a float32 in [0, 1)
    return _unit(_draw_bits(key, index))


@njit(parallel=True, cache=True, nogil=True)
def uniform_fill(out, key, start):  # type: ignore[no-untyped-def]
    """``out[j]`` = the counter-based uniform draw number ``start + j`` of ``key``, float32
    in [0, 1) on a 2^-24 grid (what :func:`alloykit.methods.task_vectors.counter_uniform`
    computes with torch ops)."""
    n = out.size
    key = np.uint64(key)
    chunks = _chunk_count(n)
    for c in prange(chunks):
        for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            out[j] = _uniform(key, start + j)


@njit(parallel=True, cache=True, nogil=True)
def random_keep_(values, key, density):  # type: ignore[no-untyped-def]
    """DARE's drop in place: zero ``values[j]`` unless draw ``j`` of ``key`` is below
    ``density`` (float32)."""
    n = values.size
    key = np.uint64(key)
    limit = np.float32(density)
    chunks = _chunk_count(n)
    for c in prange(chunks):
        start = c * CHUNK  # even: one mix serves the pair (2p, 2p + 1) of the chunk
        part = values[start : min(n, (c + 1) * CHUNK)]
        pairs = part.size // 2
        first = start >> 1
        # whole pairs in a loop without a tail test, then the odd last entry: the compiler
        # vectorises the mixes (6x faster than one loop testing for the tail inside)
        for p in range(pairs):
            z = _mix(key, first + p)
            # times 0 or 1, as the torch form does: a dropped negative entry becomes -0.0
            part[2 * p] *= 1.0 if _unit(z >> np.uint64(40)) < limit else 0.0
            part[2 * p + 1] *= 1.0 if _unit((z >> np.uint64(16)) & _LOW24) < limit else 0.0
        if part.size % 2:
            z = _mix(key, first + pairs)
            part[2 * pairs] *= 1.0 if _unit(z >> np.uint64(40)) < limit else 0.0


_DRAW_SCALE = np.float64(1 << 24)


@njit(cache=True, nogil=True)
def _della_row(row, draws, table, buffers):  # type: ignore[no-untyped-def]
    # DELLA's keep decision for one row, in place (a dropped entry becomes 0): the rule of
    # task_vectors.della_mask (keep when draw < p(average rank)) from a histogram of the
    # magnitudes' float32 bit patterns (they order like the values), counting exactly only
    # the entries whose bucket leaves the decision open. `draws` are the 24-bit integers u of
    # the draws u·2^-24, and table[k] is ceil(p(k/2)·2^24), so `draw < p(rank)` is
    # `u < table[2·rank]` (exact: the scaling is by a power of two and u is an integer)
    counts, smallest, largest, limits, magnitudes, patterns, buckets = buffers
    n = row.size
    mags = magnitudes[:n]
    bits = patterns[:n].view(np.int32)
    floats = patterns[:n]
    for j in range(n):
        mags[j] = abs(row[j])
    for j in range(n):
        floats[j] = np.float32(mags[j])
    lowest = np.int32(2147483647)
    highest = np.int32(0)
    for j in range(n):
        pattern = bits[j]
        lowest = min(lowest, pattern if pattern != 0 else np.int32(2147483647))
        highest = max(highest, pattern)
    bins = counts.size - 1
    # buckets of 2^span bit patterns, span the least for which they fit in `bins`: a shift
    # per entry instead of a 64-bit division (any monotone bucketing gives the same result);
    # zeros get bucket 0, nonzero magnitudes 1..bins
    width = max(np.int64(highest) - np.int64(lowest), 0) + 1
    span = 0
    while (width >> span) >= bins:
        span += 1
    bucket = buckets[:n]
    for j in range(n):
        pattern = bits[j]
        bucket[j] = 0 if pattern == 0 else min(1 + (max(pattern - lowest, 0) >> span), bins)
    used = min(bins + 1, ((width - 1) >> span) + 2)
    counts[:used] = 0
    smallest[:used] = np.inf
    largest[:used] = -1.0
    for j in range(n):
        b = bucket[j]
        counts[b] += 1
        smallest[b] = min(smallest[b], mags[j])
        largest[b] = max(largest[b], mags[j])
    # per bucket: the limits of u below which the entry is kept whatever its rank in the
    # bucket (low 32 bits) and kept for some rank (high 32 bits); a bucket of one value has
    # its exact average rank (lo + hi)/2, so both limits are the same
    total = 0
    for b in range(used):
        c = counts[b]
        if c:
            if smallest[b] == largest[b]:
                sure = table[2 * total + c - 1]
                limits[b] = (sure << 32) | sure
            else:
                limits[b] = (table[2 * (total + c - 1)] << 32) | table[2 * total]
        total += c
    # keep for some rank; the open entries (kept for some ranks only) keep their value until
    # the exact count below decides
    opened = False
    for j in range(n):
        limit = limits[bucket[j]]
        kept = draws[j] < (limit >> 32)
        row[j] *= 1.0 if kept else 0.0  # as the torch form's multiply: -0.0 stays signed
        opened |= kept & ~(draws[j] < (limit & 0xFFFFFFFF))
    if not opened:
        return
    for j in range(n):
        limit = limits[bucket[j]]
        if draws[j] < (limit >> 32) and not draws[j] < (limit & 0xFFFFFFFF):
            a = mags[j]  # the magnitudes as they were: the row has changed
            below = 0
            equal = 0
            for m in range(n):
                below += mags[m] < a
                equal += mags[m] == a
            row[j] *= 1.0 if draws[j] < table[2 * below + equal - 1] else 0.0


@njit(parallel=True, cache=True, nogil=True)
def della_keep_(rows, key, start, density, epsilon):  # type: ignore[no-untyped-def]
    """DELLA's drop in place on ``(r, n)`` rows: entry ``j`` of a row is kept when its draw
    (counter-based, number ``start`` + its flat index of ``key``) is below
    ``p = (density − ε) + 2ε·rank/(n − 1)``, ``rank`` its magnitude's average 0-based rank in
    its row (:func:`alloykit.methods.task_vectors.della_mask`)."""
    r, n = rows.shape
    key = np.uint64(key)
    low_p = np.float64(density - epsilon)
    two_epsilon = np.float64(2 * epsilon)
    single = np.int64(np.ceil(np.float64(density) * _DRAW_SCALE))
    # the draw limit of every average rank k/2 of a row (the same for all rows): ceil(p·2^24)
    # of p = low_p + (2ε·rank)/(n − 1), in float64 as della_probability computes it
    table = np.empty(max(2 * n - 1, 1), np.int64)
    denominator = np.float64(max(n - 1, 1))
    for k in range(table.size):
        p = low_p + (two_epsilon * (np.float64(k) / 2)) / denominator
        table[k] = np.int64(np.ceil(p * _DRAW_SCALE))
    bins = max(64, n)  # about one bucket per entry (2n: more buckets to clear and scan)
    groups = min(r, 64)  # one set of buffers per group of rows
    for g in prange(groups):
        buffers = (
            np.empty(bins + 1, np.int64),
            np.empty(bins + 1, rows.dtype),
            np.empty(bins + 1, rows.dtype),
            np.empty(bins + 1, np.int64),
            np.empty(n, rows.dtype),
            np.empty(n, np.float32),
            np.empty(n, np.int32),
        )
        draws = np.empty(n, np.int64)
        for i in range(g, r, groups):
            offset = start + i * n
            if offset % 2 == 0:  # whole pairs: one mix each, no parity test per draw
                first_pair = offset >> 1
                for p in range(n // 2):
                    z = _mix(key, first_pair + p)
                    draws[2 * p] = np.int64(z >> np.uint64(40))
                    draws[2 * p + 1] = np.int64((z >> np.uint64(16)) & _LOW24)
                if n % 2:
                    draws[n - 1] = _draw_bits(key, offset + n - 1)
            else:
                for j in range(n):
                    draws[j] = _draw_bits(key, offset + j)
            if n == 1:  # a row of one entry: kept with probability density
                rows[i, 0] *= 1.0 if draws[0] < single else 0.0
            else:
                _della_row(rows[i], draws, table, buffers)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def base_sums(rows, base):  # type: ignore[no-untyped-def]
    """Per row ``x`` of ``rows`` ``(k, n)``: ``‖x − base‖²``, ``<x, base>`` and ``‖x‖²``, and
    ``‖base‖²``, in one read of the inputs (the merge checks' sums).

    Differences in the inputs' precision, as the merge takes them; products added in float64,
    chunk by chunk, the chunks' sums in chunk order (the same result on any thread count).
    ``fastmath`` lets the compiler split each sum into vector lanes (a single running sum is
    bound by the latency of one add per entry: 4x slower); these sums only feed warnings.
    Returns ``(sums (k, 3), base_sq)``."""
    k, n = rows.shape
    chunks = _chunk_count(n)
    partial = np.zeros((chunks, k + 1, 3), np.float64)
    for c in prange(chunks):
        lo = c * CHUNK
        hi = min(n, (c + 1) * CHUNK)
        origin = base[lo:hi]  # slices, not rows[i, j]: 2-D indexing kept the loops scalar
        base_sq = 0.0
        for j in range(hi - lo):
            b = np.float64(origin[j])
            base_sq += b * b
        partial[c, k, 0] = base_sq
        for i in range(k):
            row = rows[i, lo:hi]
            delta_sq = 0.0
            dot = 0.0
            weight_sq = 0.0
            for j in range(hi - lo):
                x = row[j]
                d = np.float64(x - origin[j])
                x64 = np.float64(x)
                delta_sq += d * d
                dot += x64 * np.float64(origin[j])
                weight_sq += x64 * x64
            partial[c, i, 0] = delta_sq
            partial[c, i, 1] = dot
            partial[c, i, 2] = weight_sq
    sums = np.zeros((k, 3), np.float64)
    base_total = 0.0
    for c in range(chunks):
        for i in range(k):
            for q in range(3):
                sums[i, q] += partial[c, i, q]
        base_total += partial[c, k, 0]
    return sums, base_total


_DIGIT = 16  # bits of the key taken per counting pass of `select`


@njit(cache=True, nogil=True)
def _key(u, sign, full):  # type: ignore[no-untyped-def]
    # the float with bits u as an unsigned key in the floats' order (-0.0 taken as +0.0)
    if u == sign:
        u = np.uint64(0)
    return (~u) & full if u & sign else u | sign


@njit(cache=True, nogil=True)
def select(bits, rank, width):  # type: ignore[no-untyped-def]
    """The ``rank``-th smallest (1-based) of floats given by their ``bits`` (a ``uint32`` or
    ``uint64`` view of a NaN-free float32/float64 array; ``width`` 32 or 64), and how many
    values exceed it. Returns ``(bits, above)``: the answer's bits (-0.0 comes back as +0.0).

    A radix select on the floats' order-preserving keys: one counting pass per 16 bits of the
    key (two for float32), each over the values whose higher digits match the answer's so far.
    Linear however many values are equal, unlike an introselect on a band of heavily tied
    bfloat16 task vectors (19 ns a value there, against ~1.5 here)."""
    sign = np.uint64(1) << np.uint64(width - 1)
    full = sign | (sign - np.uint64(1))
    low_digit = np.uint64((1 << _DIGIT) - 1)
    prefix = np.uint64(0)
    mask = np.uint64(0)
    remaining = rank
    counts = np.zeros(1 << _DIGIT, np.int64)
    shift = width - _DIGIT
    while shift >= 0:
        counts[:] = 0
        s = np.uint64(shift)
        for j in range(bits.size):
            key = _key(np.uint64(bits[j]), sign, full)
            if (key & mask) == prefix:
                counts[(key >> s) & low_digit] += 1
        digit = 0
        below = 0
        while below + counts[digit] < remaining:
            below += counts[digit]
            digit += 1
        remaining -= below
        prefix |= np.uint64(digit) << s
        mask |= low_digit << s
        shift -= _DIGIT
    above = 0
    for j in range(bits.size):
        above += _key(np.uint64(bits[j]), sign, full) > prefix
    return prefix ^ sign if prefix & sign else (~prefix) & full, above


@njit(parallel=True, cache=True, nogil=True)
def to_float64_(values, out, square):  # type: ignore[no-untyped-def]
    """``out[:n] = |values|`` (``square``: ``values²``, squared in float64) as float64, and
    zeros after ``n``: one block of a stable sum, padded to whole partial sums, in one pass."""
    n = values.size
    chunks = _chunk_count(n)
    for c in prange(chunks):
        lo = c * CHUNK
        hi = min(n, (c + 1) * CHUNK)
        source = values[lo:hi]
        target = out[lo:hi]
        if square:
            for j in range(hi - lo):
                v = np.float64(source[j])
                target[j] = v * v
        else:
            for j in range(hi - lo):
                target[j] = abs(np.float64(source[j]))
    out[n:] = 0.0


@njit(parallel=True, cache=True, nogil=True)
def pair_combine(first, second, a, b, lerp, out):  # type: ignore[no-untyped-def]
    """SLERP's elementwise step into ``out`` in one pass: ``a·first + b·second`` or, with
    ``lerp``, ``first + a·(second − first)``; ``a`` and ``b`` come rounded to the tensors'
    dtype, as torch's multiply by a Python number rounds it (no fused multiply-add: the same
    roundings as the torch ops)."""
    n = out.size
    chunks = _chunk_count(n)
    for c in prange(chunks):
        lo = c * CHUNK
        hi = min(n, (c + 1) * CHUNK)
        u = first[lo:hi]
        v = second[lo:hi]
        target = out[lo:hi]
        if lerp:
            for j in range(hi - lo):
                target[j] = u[j] + a * (v[j] - u[j])
        else:
            for j in range(hi - lo):
                target[j] = a * u[j] + b * v[j]


@njit(parallel=True, cache=True, nogil=True)
def unit_products_(first, second, norm0, norm1, out):  # type: ignore[no-untyped-def]
    """``out[:n] = float64(first/norm0)·float64(second/norm1)`` (the divisions in the tensors'
    dtype, the norms rounded to it, as torch divides by a Python number), zeros after ``n``:
    one block of SLERP's stable dot product of unit vectors."""
    n = first.size
    chunks = _chunk_count(n)
    for c in prange(chunks):
        lo = c * CHUNK
        hi = min(n, (c + 1) * CHUNK)
        u = first[lo:hi]
        v = second[lo:hi]
        target = out[lo:hi]
        for j in range(hi - lo):
            target[j] = np.float64(u[j] / norm0) * np.float64(v[j] / norm1)
    out[n:] = 0.0
