"""Independent tests of the task-vector merge kernels (TIES, DARE, Model Breadcrumbs).

The kernels live in :mod:`alloykit.methods.task_vectors`. These tests were written from the
specification (MergeKit 0.1.5 semantics plus alloykit's documented improvements), not from the
implementation, and check it three ways:

1. golden cases worked out by hand (the working is in a comment next to each literal);
2. an independent NumPy float64 reading of the papers' formulas (``ref_*`` below), compared
   with the kernels on random tensors of many shapes, densities and options;
3. statistical and structural properties (DARE's unbiasedness, seeds, no sorting, inputs
   left untouched).

Papers:

* Task arithmetic: Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089.
* TIES-Merging: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
  Models", arXiv:2306.01708 (trim, elect sign, disjoint merge).
* DARE: Yu et al. 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous
  Models as a Free Lunch", arXiv:2311.03099 (drop with probability p, rescale by 1/(1-p)).
* Model Breadcrumbs: Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model
  Merging with Sparse Masks", arXiv:2312.06795 (drop the largest and the smallest entries).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alloykit.methods.task_vectors import combine, elect, merge_task_vectors, sparsify

F64 = torch.float64
RTOL = 1e-10
ATOL = 1e-12


def t(values: Any) -> torch.Tensor:
    """A float64 tensor from literals or a NumPy array."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def assert_close(
    actual: torch.Tensor, expected: Any, rtol: float = RTOL, atol: float = ATOL
) -> None:
    """Compare a kernel output with a float64 NumPy expectation (shape included)."""
    expected = np.asarray(expected, dtype=np.float64)
    got = actual.detach().to(F64).numpy()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# NumPy float64 reference (independent reading of the papers + the alloykit specification)
# --------------------------------------------------------------------------------------------


def ref_rank_desc(flat: np.ndarray) -> np.ndarray:
    """Flat indices from highest to lowest rank: larger |e| first, ties -> LOWER index first."""
    index = np.arange(flat.size)
    # np.lexsort sorts by the LAST key first: primary -|e| ascending (|e| descending),
    # secondary the flat index ascending. -0.0 == 0.0, so zeros tie and fall back to the index.
    return np.lexsort((index, -np.abs(flat)))


def ref_l1_rescale(original: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """MergeKit's L1 rescale: kept * ||original||_1 / ||kept||_1, skipped if a norm < 1e-7."""
    n_orig = np.abs(original).sum()
    n_kept = np.abs(kept).sum()
    if n_orig < 1e-7 or n_kept < 1e-7:
        return kept
    return kept * (n_orig / n_kept)


def ref_rescale(original: np.ndarray, kept: np.ndarray, density: float, rescale: str) -> np.ndarray:
    if rescale == "none":
        return kept
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        return ref_l1_rescale(original, kept)
    raise AssertionError(rescale)


def ref_magnitude(delta: np.ndarray, density: float, rescale: str = "none") -> np.ndarray:
    """TIES trim (Yadav et al. 2023, arXiv:2306.01708): keep the top max(1, int(d N)) by |e|."""
    if density >= 1:
        return delta.copy()
    if density <= 0:
        return np.zeros_like(delta)
    flat = delta.reshape(-1)
    n = flat.size
    k = max(1, int(density * n))
    keep = np.zeros(n, dtype=bool)
    keep[ref_rank_desc(flat)[:k]] = True
    kept = np.where(keep, flat, 0.0).reshape(delta.shape)
    return ref_rescale(delta, kept, density, rescale)


def ref_breadcrumbs(
    delta: np.ndarray, density: float, gamma: float, rescale: str = "none"
) -> np.ndarray:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795).

    target = int(d N), n_top = int(gamma N), n_bot = N - target - n_top (if negative, it is
    taken off n_top). Keep ascending positions [n_bot, N - n_top): exactly ``target`` entries.
    """
    if density >= 1:
        return delta.copy()
    if density <= 0:
        return np.zeros_like(delta)
    flat = delta.reshape(-1)
    n = flat.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    ascending = ref_rank_desc(flat)[::-1]  # lowest-ranked first (a strict total order reversed)
    keep = np.zeros(n, dtype=bool)
    keep[ascending[n_bot : n - n_top]] = True
    assert keep.sum() == target
    kept = np.where(keep, flat, 0.0).reshape(delta.shape)
    return ref_rescale(delta, kept, density, rescale)


def ref_sparsify(
    delta: np.ndarray, method: str, density: float, gamma: float, rescale: str
) -> np.ndarray:
    if method == "none":
        return delta.copy()
    if method == "magnitude":
        return ref_magnitude(delta, density, rescale)
    if method == "breadcrumbs":
        return ref_breadcrumbs(delta, density, gamma, rescale)
    raise AssertionError(method)


def ref_delta_norm(deltas: np.ndarray, norm: str) -> np.ndarray:
    """Scale every delta to the mean of the k norms (L1 or L2 over the whole tensor)."""
    if norm == "none":
        return deltas.copy()
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    norms = np.abs(flat).sum(axis=1) if norm == "l1" else np.sqrt((flat**2).sum(axis=1))
    target = norms.mean()
    out = deltas.copy()
    for i in range(k):
        if norms[i] != 0:
            out[i] = deltas[i] * (target / norms[i])
    return out


def ref_elect(weighted: np.ndarray, method: str) -> np.ndarray:
    """TIES sign election: "mass" = sign of sum (Yadav et al. 2023), "count" = majority vote."""
    if method == "none":
        return np.ones(weighted.shape, dtype=bool)
    signs = np.sign(weighted)
    total = weighted.sum(axis=0) if method == "mass" else signs.sum(axis=0)
    elected = np.where(total >= 0, 1.0, -1.0)
    return signs == elected[None]


def ref_combine(
    weighted: np.ndarray,
    mask: np.ndarray,
    weights: np.ndarray,
    method: str,
    normalize: bool,
    scale: float,
    scalar_divisor: bool = False,
) -> np.ndarray:
    """Disjoint merge: sum of the elected entries, divided per the spec, times lambda."""
    merged = (weighted * mask).sum(axis=0)
    if method == "sum":
        if normalize:
            if scalar_divisor:  # elect "none": D = sum_i w_i
                divisor = weights.sum()
                if abs(divisor) >= 1e-8:
                    merged = merged / divisor
            else:
                w = weights.reshape((-1,) + (1,) * (weighted.ndim - 1))
                divisor = (mask * w).sum(axis=0)
                divisor = np.where(divisor == 0, 1.0, divisor)
                merged = merged / divisor
    elif method == "mean":
        count = np.maximum(mask.sum(axis=0), 1)
        merged = merged / count
    else:
        raise AssertionError(method)
    return merged * scale


def ref_merge(
    base: np.ndarray,
    tensors: np.ndarray,
    weights: np.ndarray,
    densities: np.ndarray,
    *,
    sparsify: str = "none",
    elect: str = "none",
    combine: str = "sum",
    normalize: bool = False,
    scale: float = 1.0,
    rescale: str = "none",
    gammas: np.ndarray | None = None,
    delta_norm: str = "none",
) -> np.ndarray:
    """The whole deterministic pipeline: base + lambda * combine(elect(w * sparsify(norm(x - b))))."""
    k = tensors.shape[0]
    gammas = np.full(k, 0.01) if gammas is None else gammas
    deltas = ref_delta_norm(tensors - base[None], delta_norm)
    trimmed = np.stack(
        [
            ref_sparsify(deltas[i], sparsify, float(densities[i]), float(gammas[i]), rescale)
            for i in range(k)
        ]
    )
    weighted = trimmed * weights.reshape((-1,) + (1,) * base.ndim)
    mask = ref_elect(weighted, elect)
    merged = ref_combine(
        weighted, mask, weights, combine, normalize, scale, scalar_divisor=(elect == "none")
    )
    return base + merged


def run_merge(
    base: np.ndarray,
    tensors: np.ndarray,
    weights: np.ndarray,
    densities: np.ndarray,
    **options: Any,
) -> torch.Tensor:
    """Call the kernel with float64 tensors built from NumPy arrays."""
    if options.get("gammas") is not None:
        options["gammas"] = t(options["gammas"])
    return merge_task_vectors(t(base), t(tensors), t(weights), t(densities), **options)


PRESETS: dict[str, dict[str, Any]] = {
    # deterministic presets (MergeKit names) and the two alloykit step variants of TIES
    "ties": {"sparsify": "magnitude", "elect": "mass", "combine": "sum", "normalize": True},
    "breadcrumbs": {"sparsify": "breadcrumbs", "elect": "none", "combine": "sum"},
    "breadcrumbs_ties": {"sparsify": "breadcrumbs", "elect": "mass", "combine": "sum"},
    "magnitude_prune": {"sparsify": "magnitude", "elect": "none", "combine": "sum"},
    "task_arithmetic": {"sparsify": "none", "elect": "none", "combine": "sum"},
    "ties_count": {"sparsify": "magnitude", "elect": "count", "combine": "sum", "normalize": True},
    "ties_mean": {"sparsify": "magnitude", "elect": "mass", "combine": "mean"},
    "count_mean": {"sparsify": "breadcrumbs", "elect": "count", "combine": "mean"},
}


# --------------------------------------------------------------------------------------------
# 1. Golden cases worked out by hand
# --------------------------------------------------------------------------------------------

# TIES, 3 models x 6 elements, densities 0.5 (k = int(0.5 * 6) = 3), weights (1, 1, 0.5).
TIES_DELTAS = [
    [0.5, -0.2, 0.9, -0.1, 0.3, 0.0],
    [-0.4, 0.6, 0.8, 0.2, -0.7, 0.1],
    [0.3, -0.5, -0.6, 0.4, 0.1, -0.8],
]
TIES_WEIGHTS = [1.0, 1.0, 0.5]
# Trim (top 3 by |e|):
#   d1: |.| = .5 .2 .9 .1 .3 0   -> keep i2 (.9), i0 (.5), i4 (.3)
#   d2: |.| = .4 .6 .8 .2 .7 .1  -> keep i2 (.8), i4 (.7), i1 (.6)
#   d3: |.| = .3 .5 .6 .4 .1 .8  -> keep i5 (.8), i2 (.6), i1 (.5)
TIES_TRIMMED = [
    [0.5, 0.0, 0.9, 0.0, 0.3, 0.0],
    [0.0, 0.6, 0.8, 0.0, -0.7, 0.0],
    [0.0, -0.5, -0.6, 0.0, 0.0, -0.8],
]
# Weighted u = w * trimmed: u3 = [0, -.25, -.3, 0, 0, -.4].
# Mass S = sum u = [.5, .35, 1.4, 0, -.4, -.4] -> elected sign [+, +, +, + (S=0 -> +), -, -].
# Mask = sign(u_i) == s (zeros never in the mask):
TIES_MASK = [
    [True, False, True, False, False, False],
    [False, True, True, False, True, False],
    [False, False, False, False, False, True],
]
# M = sum mask*u = [.5, .6, 1.7, 0, -.7, -.4]
# D = sum mask*w = [1, 1, 2, 0 -> 1, 1, .5]
# normalized M / D = [.5, .6, .85, 0, -.7, -.8]
TIES_EXPECTED_SUM = [0.5, 0.6, 1.7, 0.0, -0.7, -0.4]
TIES_EXPECTED_NORMALIZED = [0.5, 0.6, 0.85, 0.0, -0.7, -0.8]


def test_golden_ties_steps() -> None:
    """Each TIES step (Yadav et al. 2023, arXiv:2306.01708) on the hand-worked example."""
    deltas = t(TIES_DELTAS)
    for i in range(3):
        assert_close(sparsify(deltas[i], "magnitude", density=0.5), TIES_TRIMMED[i], atol=0)
    weighted = t(TIES_TRIMMED) * t(TIES_WEIGHTS)[:, None]
    mask = elect(weighted, "mass")
    assert mask.dtype == torch.bool
    assert mask.shape == (3, 6)
    assert mask.tolist() == TIES_MASK
    weights = t(TIES_WEIGHTS)
    assert_close(
        combine(weighted, mask, weights, method="sum", normalize=True), TIES_EXPECTED_NORMALIZED
    )
    assert_close(combine(weighted, mask, weights, method="sum", normalize=False), TIES_EXPECTED_SUM)
    assert_close(
        combine(weighted, mask, weights, method="sum", normalize=True, scale=0.5),
        [0.25, 0.3, 0.425, 0.0, -0.35, -0.4],
    )


@pytest.mark.parametrize(
    "base", [[0.0] * 6, [1.0, -2.0, 0.5, 3.0, 0.0, -1.0]], ids=["zero_base", "offset_base"]
)
@pytest.mark.parametrize(
    ("normalize", "scale", "expected"),
    [
        (True, 1.0, TIES_EXPECTED_NORMALIZED),
        (False, 1.0, TIES_EXPECTED_SUM),
        (True, 2.0, [1.0, 1.2, 1.7, 0.0, -1.4, -1.6]),
    ],
)
def test_golden_ties_pipeline(
    base: list[float], normalize: bool, scale: float, expected: list[float]
) -> None:
    """The whole TIES pipeline returns base + lambda * (hand-worked merge)."""
    b = np.array(base)
    out = run_merge(
        b,
        b + np.array(TIES_DELTAS),
        np.array(TIES_WEIGHTS),
        np.full(3, 0.5),
        sparsify="magnitude",
        elect="mass",
        combine="sum",
        normalize=normalize,
        scale=scale,
    )
    assert_close(out, b + np.array(expected))


def test_golden_magnitude_tie_breaks_by_lower_index() -> None:
    """|e| ties are broken by flat index, lower index ranks higher (sign does not matter)."""
    delta = t([0.3, -0.7, 0.2, 0.3, -0.3, 0.1])
    # ranking: i1 (.7), then the .3 tie i0 < i3 < i4, then i2 (.2), i5 (.1)
    # d=0.5: k = int(3.0) = 3 -> {i1, i0, i3}; i4 (-0.3) loses the tie to lower indices
    assert_close(sparsify(delta, "magnitude", density=0.5), [0.3, -0.7, 0, 0.3, 0, 0], atol=0)
    # d=0.4: k = int(2.4) = 2 -> {i1, i0}
    assert_close(sparsify(delta, "magnitude", density=0.4), [0.3, -0.7, 0, 0, 0, 0], atol=0)
    # d=0.1: int(0.6) = 0 -> k = max(1, 0) = 1 -> {i1}
    assert_close(sparsify(delta, "magnitude", density=0.1), [0, -0.7, 0, 0, 0, 0], atol=0)
    # a negative entry wins a tie when its index is lower: [-.5, .5, .5, .1], d=.5 -> k=2 -> i0, i1
    assert_close(
        sparsify(t([-0.5, 0.5, 0.5, 0.1]), "magnitude", density=0.5), [-0.5, 0.5, 0, 0], atol=0
    )
    # 2-D: ties are broken by the FLAT (row-major) index: [[.2, .9], [.9, .2]], d=.5 -> k=2
    # -> flat i1 (.9), i2 (.9)
    assert_close(
        sparsify(t([[0.2, 0.9], [0.9, 0.2]]), "magnitude", density=0.5),
        [[0, 0.9], [0.9, 0]],
        atol=0,
    )
    # d = 0.75: k = 3 -> i1, i2, then the .2 tie goes to flat i0
    assert_close(
        sparsify(t([[0.2, 0.9], [0.9, 0.2]]), "magnitude", density=0.75),
        [[0.2, 0.9], [0.9, 0]],
        atol=0,
    )


def test_golden_breadcrumbs_drops_top_and_bottom() -> None:
    """Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795) with n_top > 0."""
    delta = t([0.9, -0.1, 0.5, -0.7, 0.05, 0.3, -0.2, 0.8, -0.4, 0.6])
    # N=10, d=.5 -> target 5; gamma=.1 -> n_top = int(1.0) = 1; n_bot = 10 - 5 - 1 = 4
    # ascending |.|: i4 .05, i1 .1, i6 .2, i5 .3, i8 .4, i2 .5, i9 .6, i3 .7, i7 .8, i0 .9
    # drop 4 smallest (i4, i1, i6, i5) and the largest (i0); keep i8, i2, i9, i3, i7
    expected = [0, 0, 0.5, -0.7, 0, 0, 0, 0.8, -0.4, 0.6]
    assert_close(sparsify(delta, "breadcrumbs", density=0.5, gamma=0.1), expected, atol=0)


def test_golden_breadcrumbs_with_ties() -> None:
    """Ties inside breadcrumbs follow the same total order (lower index ranks higher)."""
    delta = t([0.2, -0.2, 0.5, 0.2, 0.9, 0.1])
    # N=6, d=.5 -> target 3; gamma=.2 -> n_top = int(1.2) = 1; n_bot = 6 - 3 - 1 = 2
    # descending rank: i4 .9, i2 .5, i0 .2, i1 .2, i3 .2, i5 .1
    # ascending: i5, i3, i1, i0, i2, i4 -> drop i5, i3 (bottom 2) and i4 (top 1); keep i1, i0, i2
    expected = [0.2, -0.2, 0.5, 0, 0, 0]
    assert_close(sparsify(delta, "breadcrumbs", density=0.5, gamma=0.2), expected, atol=0)


def test_golden_breadcrumbs_n_top_zero_keeps_target() -> None:
    """gamma * N < 1 gives n_top = 0: the top ``target`` entries are kept (MergeKit <= 0.1.4
    kept none)."""
    delta = t([0.1, -0.6, 0.3, 0.05, -0.4, 0.2])
    # N=6, d=.5 -> target 3; gamma=.01 -> n_top = int(.06) = 0; n_bot = 3 -> keep top 3 by |.|:
    # i1 (.6), i4 (.4), i2 (.3)
    expected = [0, -0.6, 0.3, 0, -0.4, 0]
    assert_close(sparsify(delta, "breadcrumbs", density=0.5, gamma=0.01), expected, atol=0)
    # the default gamma is 0.01 as well
    assert_close(sparsify(delta, "breadcrumbs", density=0.5), expected, atol=0)


def test_golden_breadcrumbs_negative_n_bot() -> None:
    """n_bot < 0 is taken off n_top: still exactly ``target`` kept."""
    delta = t([0.1, -0.8, 0.3, 0.6, -0.2, 0.5, 0.4, -0.7])
    # N=8, d=.75 -> target 6; gamma=.375 -> n_top = 3; n_bot = 8 - 6 - 3 = -1
    # -> n_top = 2, n_bot = 0: drop the 2 largest (i1 .8, i7 .7), keep the other 6
    expected = [0.1, 0, 0.3, 0.6, -0.2, 0.5, 0.4, 0]
    assert_close(sparsify(delta, "breadcrumbs", density=0.75, gamma=0.375), expected, atol=0)


def test_golden_density_bounds() -> None:
    """density >= 1 returns the delta unchanged (no rescale); <= 0 gives zeros."""
    delta = t([0.3, -0.7, 0.2, 0.3])
    for method in ("none", "magnitude", "random", "breadcrumbs"):
        for rescale in ("none", "l1", "inverse"):
            for density in (1.0, 1.5):
                out = sparsify(
                    delta,
                    method,
                    density=density,
                    rescale=rescale,
                    generator=torch.Generator().manual_seed(0),
                )
                assert torch.equal(out, delta), (method, rescale, density)
    for method in ("magnitude", "breadcrumbs"):
        for density in (0.0, -0.5):
            out = sparsify(delta, method, density=density)
            assert torch.equal(out, torch.zeros_like(delta)), (method, density)


def test_golden_sparsify_rescale_on_deterministic_methods() -> None:
    """Rescale "inverse" divides by d; "l1" restores the L1 norm (as for DARE)."""
    delta = t([0.3, -0.7, 0.2, 0.3, -0.3, 0.1])  # L1 = 1.9
    # magnitude d=.5 keeps [.3, -.7, 0, .3, 0, 0] (L1 = 1.3)
    assert_close(
        sparsify(delta, "magnitude", density=0.5, rescale="inverse"), [0.6, -1.4, 0, 0.6, 0, 0]
    )
    f = 1.9 / 1.3
    assert_close(
        sparsify(delta, "magnitude", density=0.5, rescale="l1"),
        [0.3 * f, -0.7 * f, 0, 0.3 * f, 0, 0],
    )
    # breadcrumbs d=.5, gamma=.2: target 3, n_top 1, n_bot 2; descending i1, i0, i3, i4, i2, i5
    # -> drop i1 (top) and i2, i5 (bottom): keep i0, i3, i4 = [.3, 0, 0, .3, -.3, 0] (L1 = .9)
    assert_close(
        sparsify(delta, "breadcrumbs", density=0.5, gamma=0.2, rescale="inverse"),
        [0.6, 0, 0, 0.6, -0.6, 0],
    )
    g = 1.9 / 0.9
    assert_close(
        sparsify(delta, "breadcrumbs", density=0.5, gamma=0.2, rescale="l1"),
        [0.3 * g, 0, 0, 0.3 * g, -0.3 * g, 0],
    )


# Election example where "mass" (TIES / MergeKit "sum") and "count" (PEFT "frequency") differ.
# Columns: e0: u = (.9, -.2, -.3): S = .4 (+) but votes 1 - 2 = -1 (-)
#          e1: u = (.5, -.5, 0):   S = 0 (+),    votes 0 (+)   -> both elect +
#          e2: u = (-.1, .05, .02): S = -.03 (-) but votes -1 + 2 = +1 (+)
ELECT_U = [
    [0.9, 0.5, -0.1],
    [-0.2, -0.5, 0.05],
    [-0.3, 0.0, 0.02],
]
MASS_MASK = [[True, True, True], [False, False, False], [False, False, False]]
COUNT_MASK = [[False, True, False], [True, False, True], [True, False, True]]


def test_golden_elect_count_differs_from_mass() -> None:
    u = t(ELECT_U)
    assert elect(u, "mass").tolist() == MASS_MASK
    assert elect(u, "count").tolist() == COUNT_MASK
    none = elect(u, "none")
    assert none.dtype == torch.bool
    assert bool(none.all())
    assert none.shape == (3, 3)


def test_golden_elect_through_pipeline() -> None:
    """Unit weights, no sparsify: "mass" keeps the first model, "count" the majority."""
    base = np.zeros(3)
    tensors = np.array(ELECT_U)
    w = np.ones(3)
    d = np.ones(3)
    # mass: M = [.9, .5, -.1], D = 1 everywhere
    out = run_merge(base, tensors, w, d, elect="mass", combine="sum", normalize=False)
    assert_close(out, [0.9, 0.5, -0.1])
    # count: M = [-.2 - .3, .5, .05 + .02] = [-.5, .5, .07]; D = [2, 1, 2]
    out = run_merge(base, tensors, w, d, elect="count", combine="sum", normalize=False)
    assert_close(out, [-0.5, 0.5, 0.07])
    out = run_merge(base, tensors, w, d, elect="count", combine="sum", normalize=True)
    assert_close(out, [-0.25, 0.5, 0.035])


def test_golden_combine_mean() -> None:
    """Combine "mean" divides by the number of elected models (at least 1) and ignores normalize."""
    u = t(ELECT_U)
    weights = t([2.0, 0.5, 1.0])
    mass, count = t(MASS_MASK).bool(), t(COUNT_MASK).bool()
    everything = torch.ones(3, 3, dtype=torch.bool)
    nothing = torch.zeros(3, 3, dtype=torch.bool)
    for normalize in (False, True):
        # mass mask: one model per column -> the first row itself
        assert_close(
            combine(u, mass, weights, method="mean", normalize=normalize), [0.9, 0.5, -0.1]
        )
        # count mask: e0 (-.2 - .3)/2, e1 .5/1, e2 (.05 + .02)/2
        assert_close(
            combine(u, count, weights, method="mean", normalize=normalize), [-0.25, 0.5, 0.035]
        )
        # all elected: column sums (.4, 0, -.03) / 3, then lambda = 3
        assert_close(
            combine(u, everything, weights, method="mean", normalize=normalize, scale=3.0),
            [0.4, 0.0, -0.03],
        )
        # nothing elected: 0 / max(0, 1) = 0, no NaN
        assert_close(combine(u, nothing, weights, method="mean", normalize=normalize), [0, 0, 0])
    # compare: "sum" normalize with the mass mask divides by w_1 = 2 instead
    assert_close(combine(u, mass, weights, method="sum", normalize=True), [0.45, 0.25, -0.05])
    # count mask, sum normalize: D = [.5 + 1, 2, .5 + 1] -> [-.5/1.5, .5/2, .07/1.5]
    assert_close(
        combine(u, count, weights, method="sum", normalize=True),
        [-0.5 / 1.5, 0.25, 0.07 / 1.5],
    )


def test_golden_mean_in_pipeline() -> None:
    """TIES with combine "mean" on the TIES golden example (weights 1, 1, .5)."""
    # mask counts per column (from TIES_MASK): [1, 1, 2, 0 -> 1, 1, 1]
    # M = [.5, .6, 1.7, 0, -.7, -.4] -> mean = [.5, .6, .85, 0, -.7, -.4]
    out = run_merge(
        np.zeros(6),
        np.array(TIES_DELTAS),
        np.array(TIES_WEIGHTS),
        np.full(3, 0.5),
        sparsify="magnitude",
        elect="mass",
        combine="mean",
        normalize=True,
    )
    assert_close(out, [0.5, 0.6, 0.85, 0.0, -0.7, -0.4])


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        # d1 = [3, 4] (L1 7, L2 5); d2 = [0, 1] (L1 1, L2 1)
        # l2: mean 3 -> d1 = [3, 4] * 3/5 = [1.8, 2.4]; d2 = [0, 3]; sum = [1.8, 5.4]
        ("l2", [1.8, 5.4]),
        # l1: mean 4 -> d1 = [3, 4] * 4/7 = [12/7, 16/7]; d2 = [0, 4]; sum = [12/7, 44/7]
        ("l1", [12 / 7, 44 / 7]),
        ("none", [3.0, 5.0]),
    ],
)
def test_golden_delta_norm(norm: str, expected: list[float]) -> None:
    out = run_merge(
        np.zeros(2), np.array([[3.0, 4.0], [0.0, 1.0]]), np.ones(2), np.ones(2), delta_norm=norm
    )
    assert_close(out, expected)


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        # norms (5, 1, 0): mean 2 -> d1 = [1.2, 1.6], d2 = [0, 2], d3 stays 0 -> [1.2, 3.6]
        ("l2", [1.2, 3.6]),
        # norms (7, 1, 0): mean 8/3 -> d1 = [3, 4] * 8/21 = [8/7, 32/21], d2 = [0, 8/3]
        # -> [8/7, 32/21 + 56/21 = 88/21]
        ("l1", [8 / 7, 88 / 21]),
    ],
)
def test_golden_delta_norm_with_a_zero_delta(norm: str, expected: list[float]) -> None:
    """A zero task vector stays zero (no 0/0) but still counts in the mean of the norms."""
    base = np.array([1.0, -1.0])
    tensors = base + np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])
    out = run_merge(base, tensors, np.ones(3), np.ones(3), delta_norm=norm)
    assert torch.isfinite(out).all()
    assert_close(out, base + np.array(expected))


def test_golden_delta_norm_happens_before_sparsify() -> None:
    """delta_norm rescales the task vectors before trim and election, and can flip the vote."""
    # d1 = [3, 3, 3, 0] (L1 9, L2 3 sqrt 3), d2 = [-2, 0, 0, 0] (L1 2, L2 2); magnitude
    # d = .25 -> k = int(1.0) = 1 (d1's three-way tie goes to i0).
    # no norm:  d1' = [3, 0, 0, 0], d2' = [-2, 0, 0, 0]; S0 = 1 -> + -> d1 alone: 3
    # l1: mean 5.5 -> d1 = [11/6] * 3, d2 = [-5.5]; trim d1' = [11/6, 0, 0, 0];
    #     S0 = 11/6 - 5.5 < 0 -> - -> d2 alone: -5.5
    # l2: mean m = (3 sqrt 3 + 2)/2 -> d2 = [-m]; d1[0] = m / sqrt 3 < m -> -m
    base = np.zeros(4)
    tensors = np.array([[3.0, 3.0, 3.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    kwargs: dict[str, Any] = {
        "sparsify": "magnitude",
        "elect": "mass",
        "combine": "sum",
        "normalize": True,
    }
    out = run_merge(base, tensors, np.ones(2), np.full(2, 0.25), **kwargs)
    assert_close(out, [3.0, 0, 0, 0])
    out = run_merge(base, tensors, np.ones(2), np.full(2, 0.25), delta_norm="l1", **kwargs)
    assert_close(out, [-5.5, 0, 0, 0])
    m = (3 * math.sqrt(3) + 2) / 2
    out = run_merge(base, tensors, np.ones(2), np.full(2, 0.25), delta_norm="l2", **kwargs)
    assert_close(out, [-m, 0, 0, 0])


def test_golden_task_arithmetic_scalar_divisor() -> None:
    """elect "none": D = sum_i w_i is one scalar; |D| < 1e-8 means no division."""
    base = np.zeros(2)
    tensors = np.array([[1.0, 2.0], [3.0, -1.0]])
    # w = (1, 3): D = 4 -> (1*[1, 2] + 3*[3, -1]) / 4 = [10, -1] / 4
    out = run_merge(base, tensors, np.array([1.0, 3.0]), np.ones(2), normalize=True)
    assert_close(out, [2.5, -0.25])
    # w = (1, -1 + 5e-9): |D| = 5e-9 < 1e-8 -> no division: [1 - 3(1 - 5e-9), 2 + (1 - 5e-9)]
    w = np.array([1.0, -1.0 + 5e-9])
    out = run_merge(base, tensors, w, np.ones(2), normalize=True)
    assert_close(out, [1.0 + 3 * w[1], 2.0 - w[1]])


def test_golden_negative_weight_flips_the_vote() -> None:
    """The election uses the weighted u_i = w_i * delta_i, so a negative weight votes reversed."""
    base = np.zeros(2)
    tensors = np.array([[1.0, 1.0], [1.0, -2.0]])
    # w = (1, -1): u1 = [1, 1], u2 = [-1, 2]; S = [0 (+), 3 (+)]
    # mask: e0 keeps u1 only; e1 keeps both. M = [1, 3]; D = [1, 1 - 1 = 0 -> 1] -> [1, 3]
    out = run_merge(
        base,
        tensors,
        np.array([1.0, -1.0]),
        np.ones(2),
        elect="mass",
        combine="sum",
        normalize=True,
    )
    assert_close(out, [1.0, 3.0])


# --------------------------------------------------------------------------------------------
# 2. Reference comparisons on random tensors
# --------------------------------------------------------------------------------------------

SHAPES: list[tuple[int, ...]] = [(1,), (6,), (40,), (7, 13), (4, 5), (1, 1), (3, 2, 5)]


def random_case(
    rng: np.random.Generator, shape: tuple[int, ...], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A base and k fine-tunes with continuous random deltas (magnitude ties are measure-zero)."""
    base = rng.standard_normal(shape)
    deltas = rng.standard_normal((k, *shape)) * rng.uniform(
        0.01, 0.5, size=(k,) + (1,) * len(shape)
    )
    return base, base + deltas, deltas


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_preset_matches_reference(preset: str, shape: tuple[int, ...], normalize: bool) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{preset}{shape}{normalize}".encode()))
    k = 3
    base, tensors, _ = random_case(rng, shape, k)
    weights = rng.uniform(0.2, 1.5, size=k)
    densities = np.array([0.3, 0.55, 0.9])
    gammas = np.array([0.05, 0.1, 0.2])  # model 3: d + gamma > 1 -> n_bot < 0 branch
    options = dict(PRESETS[preset], normalize=normalize, scale=0.8, gammas=gammas)
    expected = ref_merge(base, tensors, weights, densities, **options)
    out = run_merge(base, tensors, weights, densities, **options)
    assert out.dtype == F64
    assert_close(out, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    k=st.integers(1, 4),
    preset=st.sampled_from(list(PRESETS)),
    normalize=st.booleans(),
    rescale=st.sampled_from(["none", "l1", "inverse"]),
    delta_norm=st.sampled_from(["none", "l1", "l2"]),
    scale=st.sampled_from([1.0, 0.5, 1.7]),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_pipeline_matches_reference_hypothesis(
    shape: tuple[int, ...],
    k: int,
    preset: str,
    normalize: bool,
    rescale: str,
    delta_norm: str,
    scale: float,
    data: st.DataObject,
    seed: int,
) -> None:
    densities = np.array(
        data.draw(
            st.lists(
                st.one_of(st.floats(0.01, 1.0), st.just(1.0), st.just(0.5)),
                min_size=k,
                max_size=k,
            )
        )
    )
    gammas = np.array(data.draw(st.lists(st.floats(0.0, 0.4), min_size=k, max_size=k)))
    rng = np.random.default_rng(seed)
    base, tensors, _ = random_case(rng, shape, k)
    weights = rng.uniform(0.2, 1.5, size=k)
    options = dict(
        PRESETS[preset],
        normalize=normalize,
        scale=scale,
        rescale=rescale,
        delta_norm=delta_norm,
        gammas=gammas,
    )
    expected = ref_merge(base, tensors, weights, densities, **options)
    out = run_merge(base, tensors, weights, densities, **options)
    assert_close(out, expected)


@settings(max_examples=80, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
    method=st.sampled_from(["magnitude", "breadcrumbs"]),
    density=st.one_of(st.floats(-0.2, 1.2), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])),
    gamma=st.floats(0.0, 0.5),
    rescale=st.sampled_from(["none", "l1", "inverse"]),
    ties=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sparsify_matches_reference_hypothesis(
    shape: tuple[int, ...],
    method: str,
    density: float,
    gamma: float,
    rescale: str,
    ties: bool,
    seed: int,
) -> None:
    """Trim / breadcrumbs on random tensors, optionally with many deliberate |e| ties."""
    rng = np.random.default_rng(seed)
    if ties:  # few distinct magnitudes, random signs: exercises the index tie-break
        delta = rng.integers(0, 4, size=shape) * 0.25 * rng.choice([-1.0, 1.0], size=shape)
    else:
        delta = rng.standard_normal(shape)
    expected = ref_sparsify(delta, method, density, gamma, rescale)
    out = sparsify(t(delta), method, density=density, gamma=gamma, rescale=rescale)
    assert out.shape == delta.shape
    assert_close(out, expected)
    if rescale == "none":  # no arithmetic at all: every kept entry is bit-exact
        assert np.array_equal(out.numpy(), expected)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple),
    k=st.integers(1, 5),
    method=st.sampled_from(["none", "mass", "count"]),
    zero_fraction=st.sampled_from([0.0, 0.3, 0.7]),
    seed=st.integers(0, 2**32 - 1),
)
def test_elect_and_combine_match_reference_hypothesis(
    shape: tuple[int, ...], k: int, method: str, zero_fraction: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((k, *shape))
    u[rng.random(u.shape) < zero_fraction] = 0.0  # trimmed entries: never elected
    weights = rng.uniform(0.2, 1.5, size=k)
    mask = elect(t(u), method)
    expected_mask = ref_elect(u, method)
    assert mask.dtype == torch.bool
    assert np.array_equal(mask.numpy(), expected_mask)
    for how in ("sum", "mean"):
        for normalize in (False, True):
            out = combine(t(u), mask, t(weights), method=how, normalize=normalize, scale=1.3)
            assert_close(out, ref_combine(u, expected_mask, weights, how, normalize, 1.3))


EDGE_CASES = ["all_zero", "identical", "opposite", "density_one", "one_element"]


def edge_case(name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, tensors, densities) for the named edge case; exact arithmetic where it matters."""
    rng = np.random.default_rng(7)
    if name == "all_zero":  # fine-tunes equal to a zero base
        return np.zeros(shape), np.zeros((2, *shape)), np.array([0.5, 0.3])
    if name == "identical":  # x_i == base: every delta is exactly 0
        base = rng.standard_normal(shape)
        return base, np.stack([base, base, base]), np.array([0.5, 0.3, 0.9])
    if name == "opposite":  # delta_2 = -delta_1 exactly (zero base keeps it exact)
        d = rng.standard_normal(shape)
        return np.zeros(shape), np.stack([d, -d]), np.array([0.4, 0.4])
    if name == "density_one":
        base = rng.standard_normal(shape)
        return base, base + rng.standard_normal((3, *shape)), np.ones(3)
    if name == "one_element":
        return np.array([0.5]), np.array([[0.7], [-0.1], [0.2]]), np.array([0.5, 0.3, 0.9])
    raise AssertionError(name)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", EDGE_CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_edge_cases_match_reference(preset: str, name: str, normalize: bool) -> None:
    base, tensors, densities = edge_case(name, (5, 3))
    k = tensors.shape[0]
    weights = np.ones(k)  # equal weights: the "opposite" case sums to exactly zero
    options = dict(PRESETS[preset], normalize=normalize)
    expected = ref_merge(base, tensors, weights, densities, **options)
    out = run_merge(base, tensors, weights, densities, **options)
    assert torch.isfinite(out).all()
    assert_close(out, expected)


def test_edge_case_consequences_by_hand() -> None:
    """What the reference says for the edge cases, spelled out."""
    ties = PRESETS["ties"]
    # identical models: every delta is 0, nothing elected, D = 0 -> 1: the base, bit for bit
    base, tensors, densities = edge_case("identical", (5, 3))
    out = run_merge(base, tensors, np.ones(3), densities, **ties)
    assert np.array_equal(out.numpy(), base)
    # opposite signs, equal weights, zero base: S = 0 everywhere -> + elected, so TIES returns
    # the positive member of each trimmed pair: |trim(delta)|
    _, tensors, densities = edge_case("opposite", (5, 3))
    out = run_merge(np.zeros((5, 3)), tensors, np.ones(2), densities, **ties)
    assert_close(out, np.abs(ref_magnitude(tensors[0], 0.4)))
    # ...while task arithmetic cancels exactly
    out = run_merge(np.zeros((5, 3)), tensors, np.ones(2), densities, **PRESETS["task_arithmetic"])
    assert_close(out, np.zeros((5, 3)), atol=0)
    # one-element tensor: trim keeps max(1, int(d)) = 1 element, breadcrumbs int(d) = 0
    one = np.array([[0.7]])
    assert_close(sparsify(t(one[0]), "magnitude", density=0.3), [0.7], atol=0)
    assert_close(sparsify(t(one[0]), "breadcrumbs", density=0.3), [0.0], atol=0)


# --------------------------------------------------------------------------------------------
# 3. DARE (Yu et al. 2023, arXiv:2311.03099): statistics, seeds, rescaling
# --------------------------------------------------------------------------------------------


def dare(delta: torch.Tensor, density: float, seed: int, rescale: str = "none") -> torch.Tensor:
    return sparsify(
        delta,
        "random",
        density=density,
        rescale=rescale,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_inverse_is_unbiased(density: float) -> None:
    """E[mask * delta / d] = delta; per-element variance delta^2 (1 - d) / d; 5-sigma bound."""
    rng = np.random.default_rng(1)
    delta = rng.uniform(0.5, 2.0, size=64) * rng.choice([-1.0, 1.0], size=64)
    n = 500
    draws = np.stack([dare(t(delta), density, seed, "inverse").numpy() for seed in range(n)])
    mean = draws.mean(axis=0)
    sigma = np.abs(delta) * math.sqrt((1 - density) / density / n)
    assert np.all(np.abs(mean - delta) <= 5 * sigma), np.max(np.abs(mean - delta) / sigma)
    # every draw is either 0 or delta / d exactly (up to one rounding)
    kept = draws != 0
    np.testing.assert_allclose(
        draws[kept], np.broadcast_to(delta / density, draws.shape)[kept], rtol=1e-14
    )


@pytest.mark.parametrize("density", [0.05, 0.37, 0.9])
def test_dare_kept_fraction_is_binomial(density: float) -> None:
    """Each entry is kept independently with probability d: count ~ Binomial(N, d)."""
    n = 200_000
    delta = torch.ones(n, dtype=F64)
    out = dare(delta, density, seed=3)
    kept = int((out != 0).sum())
    sd = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) <= 5 * sd, (kept, n * density, sd)
    # rescale "none": the kept entries are the delta itself
    assert torch.equal(out[out != 0], delta[out != 0])


def test_dare_mask_is_elementwise_not_a_fixed_count() -> None:
    """Over many small draws the kept count varies (Bernoulli, not an exact top-k)."""
    delta = t(np.linspace(1.0, 2.0, 20))
    counts = {int((dare(delta, 0.5, seed) != 0).sum()) for seed in range(50)}
    assert len(counts) > 1


def test_dare_seeds() -> None:
    """Same seed: bit-identical; different seeds: different masks."""
    delta = t(np.random.default_rng(2).standard_normal((30, 40)))
    for rescale in ("none", "inverse", "l1"):
        a = dare(delta, 0.4, seed=123, rescale=rescale)
        b = dare(delta, 0.4, seed=123, rescale=rescale)
        c = dare(delta, 0.4, seed=124, rescale=rescale)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert a.shape == delta.shape


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_l1_rescale_restores_l1_norm(density: float) -> None:
    """rescale "l1": out = delta * mask * ||delta||_1 / ||delta * mask||_1 (MergeKit default)."""
    delta_np = np.random.default_rng(4).standard_normal((17, 11))
    delta = t(delta_np)
    for seed in range(5):
        out = dare(delta, density, seed, "l1")
        np.testing.assert_allclose(out.abs().sum().item(), np.abs(delta_np).sum(), rtol=1e-12)
        mask = out.numpy() != 0
        expected = ref_l1_rescale(delta_np, np.where(mask, delta_np, 0.0))
        assert_close(out, expected)


def test_dare_l1_rescale_skips_tiny_norms() -> None:
    """No L1 scaling when ||delta||_1 < 1e-7: the kept entries are left as they are."""
    delta = torch.full((10,), 1e-9, dtype=F64)  # L1 = 1e-8
    for seed in range(5):
        out = dare(delta, 0.5, seed, "l1")
        kept = out != 0
        assert torch.equal(out[kept], delta[kept])
    # nothing kept (||delta * mask||_1 = 0 < 1e-7): zeros, no NaN
    big = torch.ones(3, dtype=F64)
    for seed in range(200):
        out = dare(big, 0.05, seed, "l1")
        assert torch.isfinite(out).all()
        if not bool((out != 0).any()):
            break
    else:  # pragma: no cover - P(never empty) = (1 - .95^3)^200 ~ 1e-135
        raise AssertionError("no empty mask drawn")


def test_dare_pipelines_one_model() -> None:
    """dare_linear / dare_ties with one model: base + w * rescaled(delta * mask)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((6, 7))
    delta = rng.standard_normal((6, 7))
    w = 0.8
    for elect_method, normalize in (("none", False), ("mass", False)):
        out = run_merge(
            base,
            (base + delta)[None],
            np.array([w]),
            np.array([0.4]),
            sparsify="random",
            elect=elect_method,
            combine="sum",
            normalize=normalize,
            rescale="l1",
            generator=torch.Generator().manual_seed(9),
        )
        contribution = out.numpy() - base
        mask = np.abs(contribution) > 1e-12
        assert 0 < mask.sum() < delta.size
        expected = base + w * ref_l1_rescale(delta, np.where(mask, delta, 0.0))
        assert_close(out, expected, atol=1e-12)


def test_dare_pipeline_seeded_and_density_one() -> None:
    """Seeded pipelines are reproducible; at density 1, dare_ties == TIES without trim and
    dare_linear == task arithmetic."""
    rng = np.random.default_rng(6)
    base, tensors, _ = random_case(rng, (9, 5), 3)
    weights = np.array([1.0, 0.5, 0.8])
    dare_ties = {"sparsify": "random", "elect": "mass", "combine": "sum", "rescale": "l1"}
    dare_linear = {"sparsify": "random", "elect": "none", "combine": "sum", "rescale": "l1"}
    for options in (dare_ties, dare_linear):
        a = run_merge(
            base,
            tensors,
            weights,
            np.full(3, 0.5),
            generator=torch.Generator().manual_seed(1),
            **options,
        )
        b = run_merge(
            base,
            tensors,
            weights,
            np.full(3, 0.5),
            generator=torch.Generator().manual_seed(1),
            **options,
        )
        c = run_merge(
            base,
            tensors,
            weights,
            np.full(3, 0.5),
            generator=torch.Generator().manual_seed(2),
            **options,
        )
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        full = run_merge(
            base,
            tensors,
            weights,
            np.ones(3),
            generator=torch.Generator().manual_seed(1),
            **options,
        )
        plain = dict(options, sparsify="none", rescale="none")
        assert_close(full, ref_merge(base, tensors, weights, np.ones(3), **plain))


# --------------------------------------------------------------------------------------------
# 4. No sorting: the rankings must be computed without torch.sort / argsort
# --------------------------------------------------------------------------------------------


def test_no_sorting(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sorting is not allowed in the task-vector kernels")

    rng = np.random.default_rng(8)
    delta = rng.integers(0, 5, size=(7, 13)) * 0.125 * rng.choice([-1.0, 1.0], size=(7, 13))
    base, tensors, _ = random_case(rng, (7, 13), 3)
    weights = np.array([1.0, 0.7, 0.4])
    densities = np.array([0.3, 0.5, 0.8])
    expected_mag = ref_magnitude(delta, 0.37)
    expected_bc = ref_breadcrumbs(delta, 0.37, 0.11)
    expected_merges = {
        name: ref_merge(base, tensors, weights, densities, **PRESETS[name])
        for name in ("ties", "breadcrumbs_ties")
    }

    monkeypatch.setattr(torch, "sort", forbidden)
    monkeypatch.setattr(torch, "argsort", forbidden)
    monkeypatch.setattr(torch.Tensor, "sort", forbidden)
    monkeypatch.setattr(torch.Tensor, "argsort", forbidden)
    with pytest.raises(AssertionError, match="sorting"):
        torch.sort(t([2.0, 1.0]))  # the patch is in force
    with pytest.raises(AssertionError, match="sorting"):
        t([2.0, 1.0]).argsort()

    assert_close(sparsify(t(delta), "magnitude", density=0.37), expected_mag, atol=0)
    assert_close(sparsify(t(delta), "breadcrumbs", density=0.37, gamma=0.11), expected_bc, atol=0)
    for name, expected in expected_merges.items():
        assert_close(run_merge(base, tensors, weights, densities, **PRESETS[name]), expected)


# --------------------------------------------------------------------------------------------
# 5. Inputs are never modified
# --------------------------------------------------------------------------------------------


def _unchanged(call: Callable[[], Any], *tensors: torch.Tensor) -> None:
    before = [x.clone() for x in tensors]
    call()
    for old, new in zip(before, tensors, strict=True):
        assert torch.equal(old, new)


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(10)
    base_np, tensors_np, deltas_np = random_case(rng, (6, 5), 3)
    base, tensors = t(base_np), t(tensors_np)
    weights, densities, gammas = t([1.0, 0.6, 0.9]), t([0.3, 0.5, 0.7]), t([0.1, 0.05, 0.2])
    delta = t(deltas_np[0])
    for method in ("none", "magnitude", "random", "breadcrumbs"):
        for rescale in ("none", "l1", "inverse"):
            _unchanged(
                lambda m=method, r=rescale: sparsify(
                    delta,
                    m,
                    density=0.4,
                    gamma=0.1,
                    rescale=r,
                    generator=torch.Generator().manual_seed(0),
                ),
                delta,
            )
            # density >= 1 may hand back the input itself; the caller's tensor must survive
            _unchanged(
                lambda m=method, r=rescale: sparsify(delta, m, density=1.0, rescale=r), delta
            )
    u = t(deltas_np) * weights[:, None, None]
    u[0, 0, :] = 0.0
    for method in ("none", "mass", "count"):
        mask = elect(u, method)
        _unchanged(lambda m=method: elect(u, m), u)
        for how in ("sum", "mean"):
            for normalize in (False, True):
                _unchanged(
                    lambda h=how, n=normalize, mk=mask: combine(
                        u, mk, weights, method=h, normalize=n, scale=0.7
                    ),
                    u,
                    mask,
                    weights,
                )
    for options in [*PRESETS.values(), {"sparsify": "random", "elect": "mass", "rescale": "l1"}]:
        for delta_norm in ("none", "l1", "l2"):
            _unchanged(
                lambda o=options, dn=delta_norm: merge_task_vectors(
                    base,
                    tensors,
                    weights,
                    densities,
                    gammas=gammas,
                    delta_norm=dn,
                    generator=torch.Generator().manual_seed(0),
                    **o,
                ),
                base,
                tensors,
                weights,
                densities,
                gammas,
            )
    # density 1 everywhere (the unchanged-delta path) must not alias the caller's tensors
    _unchanged(
        lambda: merge_task_vectors(base, tensors, weights, torch.ones(3, dtype=F64)),
        base,
        tensors,
        weights,
    )
