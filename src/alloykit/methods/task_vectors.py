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

from dataclasses import dataclass
from typing import Literal

import torch

from alloykit.methods.reductions import stable_row_sums

Sparsifier = Literal["none", "magnitude", "random", "breadcrumbs", "della"]
Election = Literal["none", "mass", "count"]
Combination = Literal["sum", "mean"]
Rescale = Literal["none", "l1", "inverse"]
DeltaNorm = Literal["none", "l1", "l2"]

# MergeKit treats a weight sum below this as zero and then does not divide (reference §1.2).
ZERO_WEIGHT_SUM = 1e-8
# MergeKit's L1 rescale is skipped when either norm is below this (reference §1.3).
RESCALE_EPSILON = 1e-7


def stable_sum(values: torch.Tensor) -> float:
    """Sum of all elements in float64, in an order fixed by the size alone (not by threads)."""
    return float(stable_row_sums(values.reshape(-1)))


def top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` top-ranked elements of a tensor of magnitudes.

    Ranked by value, ties broken by the lower flat index; exactly ``min(max(k, 0), n)``
    elements are True. O(n): one ``kthvalue`` and a running count of the tied elements.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = float(torch.kthvalue(flat, n - k + 1).values)  # the k-th largest value
    return threshold_mask(magnitude, threshold, k - int((flat > threshold).sum()))


def threshold_mask(magnitude: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """Keep the magnitudes above ``threshold`` and the first ``ties`` equal to it (by index)."""
    flat = magnitude.reshape(-1)
    tied = flat == threshold
    keep = (flat > threshold) | (tied & (torch.cumsum(tied, dim=0) <= ties))
    return keep.view(magnitude.shape)


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


def _rescale(
    delta: torch.Tensor, kept: torch.Tensor, density: float, rescale: Rescale
) -> torch.Tensor:
    if rescale == "inverse":  # the DARE paper's 1/(1−p), p the drop rate
        return kept / density
    if rescale == "l1":  # MergeKit: match the L1 norm of the whole task vector
        before, after = stable_sum(delta.abs()), stable_sum(kept.abs())
        if before > RESCALE_EPSILON and after > RESCALE_EPSILON:
            return kept * (before / after)
    return kept


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
    if method == "none" or density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    n = delta.numel()
    if method == "magnitude" and model_threshold is not None:
        keep = threshold_mask(delta.abs(), model_threshold[0], model_threshold[1])
    elif method == "magnitude":
        keep = top_mask(delta.abs(), max(1, int(density * n)))
    elif method == "breadcrumbs":
        target, n_top = int(density * n), int(gamma * n)
        n_bottom = n - target - n_top
        if n_bottom < 0:
            n_top, n_bottom = n_top + n_bottom, 0
        magnitude = delta.abs()
        keep = top_mask(magnitude, n - n_bottom) & ~top_mask(magnitude, n_top)
    elif method == "random":
        draws = torch.rand(
            delta.shape, generator=generator, device=delta.device, dtype=torch.float32
        )
        keep = draws < density
    elif method == "della":
        problem = della_bounds_problem(density, epsilon)
        if problem:
            raise ValueError(problem)
        if rescale == "inverse":
            raise ValueError(INVERSE_DELLA)
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
        draws = torch.rand(rows.shape, generator=generator, device=delta.device)
        keep = della_mask(rows.abs(), density, epsilon, draws).view(delta.shape)
    else:
        raise ValueError(f"unknown sparsify method {method!r}")
    return _rescale(delta, delta * keep, density, rescale)


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


def elect(weighted: torch.Tensor, method: Election) -> torch.Tensor:
    """Elect step: which models' entries agree with the elected sign, ``(k, *shape)`` bool.

    ``mass``: the sign of ``Σ_i u_i`` (TIES; MergeKit's ``sum``); ``count``: the sign of
    ``Σ_i sign(u_i)`` (PEFT's alternative); a zero total elects ``+``. An entry equal to zero
    has no sign and never agrees. ``none``: every entry agrees.

    Example:
        >>> elect(torch.tensor([[1.0, -1.0], [-3.0, -1.0], [1.0, 2.0]]), "count").tolist()
        [[True, True], [False, True], [True, False]]
    """
    if method == "none":
        return torch.ones_like(weighted, dtype=torch.bool)
    signs = torch.sign(weighted)
    votes = weighted if method == "mass" else signs
    if method not in ("mass", "count"):
        raise ValueError(f"unknown elect method {method!r}")
    total = votes[0].clone()
    for row in votes[1:]:  # fixed order: the vote does not depend on threads
        total += row
    majority = torch.where(total >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == majority


def combine(
    weighted: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    method: Combination,
    normalize: bool,
    scale: float = 1.0,
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

    Example:
        >>> u = torch.tensor([[2.0, 1.0], [4.0, -1.0]])
        >>> combine(u, None, torch.tensor([1.0, 1.0]), method="mean", normalize=False)
        tensor([3., 0.])
    """
    out = torch.zeros_like(weighted[0])
    for i in range(weighted.shape[0]):  # fixed order: the result does not depend on threads
        out += weighted[i] if mask is None else weighted[i] * mask[i]
    if method == "mean":
        count = (
            torch.full_like(out, weighted.shape[0])
            if mask is None
            else mask.sum(dim=0).to(out.dtype)
        )
        out /= count.clamp(min=1)
    elif method == "sum" and normalize:
        if mask is None:
            divisor = float(weights.sum())
            if abs(divisor) >= ZERO_WEIGHT_SUM:
                out /= divisor
        else:
            divisor_tensor = torch.zeros_like(out)
            for i in range(weighted.shape[0]):
                # mask[i] must become out's dtype first: bool times a float is float32
                divisor_tensor.add_(mask[i].to(out.dtype), alpha=float(weights[i]))
            out /= torch.where(divisor_tensor == 0, 1.0, divisor_tensor)
    elif method != "sum":
        raise ValueError(f"unknown combine method {method!r}")
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
        stable_sum(d.abs()) if norm == "l1" else stable_sum(d.double() ** 2) ** 0.5 for d in deltas
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
    for i in range(deltas.shape[0]):
        deltas[i] *= float(weights[i])
    mask = None if steps.elect == "none" else elect(deltas, steps.elect)
    return combine(
        deltas, mask, weights, method=steps.combine, normalize=steps.normalize, scale=steps.scale
    )


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
            deltas[i] = sparsify(
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
