"""Task-vector methods: merges of the differences between each fine-tune and the base.

A task vector is ``δ_i = x_i − base`` (Ilharco et al. 2023, "Editing models with task
arithmetic", arXiv:2212.04089). Every method here is the same three steps, each written once:

1. **sparsify** each task vector: ``none``; ``magnitude`` (TIES trim: keep the top-k by
   magnitude, Yadav et al. 2023, arXiv:2306.01708); ``random`` (DARE drop-and-rescale, Yu et al.
   2023, arXiv:2311.03099); ``breadcrumbs`` (drop the smallest and the largest, Davari &
   Belilovsky 2023, arXiv:2312.06795);
2. **elect** a sign per element: ``none``; ``mass`` (the sign of the weighted sum, TIES);
   ``count`` (the sign most models have, PEFT's option);
3. **combine** the agreeing, weighted task vectors: ``sum`` (optionally divided by the sum of
   the agreeing weights) or ``mean`` (divided by the number of agreeing models), times λ.

Named methods (``ties``, ``dare_ties``, ...) are presets: a choice of steps and defaults.

Every magnitude ranking uses one total order: larger ``|δ|`` first, and among equal magnitudes
the lower flat index first, so exactly k elements are kept, deterministically. Selection is
O(n) (``torch.kthvalue`` plus a count of ties), never a sort. Sums that decide a result
(norms, sign votes) run in a fixed order, so outputs do not depend on the thread count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Sparsifier = Literal["none", "magnitude", "random", "breadcrumbs"]
Election = Literal["none", "mass", "count"]
Combination = Literal["sum", "mean"]
Rescale = Literal["none", "l1", "inverse"]
DeltaNorm = Literal["none", "l1", "l2"]

# MergeKit treats a weight sum below this as zero and then does not divide (reference §1.2).
ZERO_WEIGHT_SUM = 1e-8
# MergeKit's L1 rescale is skipped when either norm is below this (reference §1.3).
RESCALE_EPSILON = 1e-7
_CHUNK = 32768  # elements per partial sum: below torch's parallel grain, so each is one thread


def stable_sum(values: torch.Tensor) -> float:
    """Sum of all elements in float64, in an order fixed by the size alone (not by threads)."""
    flat = values.reshape(-1).to(torch.float64)
    while flat.numel() > _CHUNK:
        padded = torch.nn.functional.pad(flat, (0, -flat.numel() % _CHUNK))
        flat = padded.view(-1, _CHUNK).sum(dim=1)
    return float(flat.sum())


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
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    above = flat > threshold
    missing = k - int(above.sum())
    tied = flat == threshold
    keep = above | (tied & (torch.cumsum(tied, dim=0) <= missing))
    return keep.view(magnitude.shape)


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
    generator: torch.Generator | None = None,
    rescale: Rescale = "none",
) -> torch.Tensor:
    """Sparsify step: keep a ``density`` fraction of one task vector.

    - ``magnitude``: keep the ``max(1, int(density·N))`` largest ``|δ|`` (TIES trim);
    - ``breadcrumbs``: with ``target = int(density·N)`` and ``n_top = int(gamma·N)``, drop the
      ``n_top`` largest and the ``N − target − n_top`` smallest, keeping exactly ``target``
      (MergeKit up to 0.1.4 kept nothing when ``gamma·N < 1``);
    - ``random``: keep each element with probability ``density`` (DARE), drawn from
      ``generator``;
    - ``none``: unchanged.

    ``rescale`` then scales the kept values: ``inverse`` by ``1/density`` (the DARE paper),
    ``l1`` so the L1 norm is unchanged (MergeKit's rule, skipped below 1e-7), ``none``.
    ``density >= 1`` returns ``delta`` unchanged; ``density <= 0`` gives zeros.

    Args:
        delta: one task vector, any shape.
        method: ``none``, ``magnitude``, ``random`` or ``breadcrumbs``.
        density: fraction of elements kept, in [0, 1].
        gamma: breadcrumbs' fraction of largest elements dropped (default 0.01).
        generator: random source for ``random``.
        rescale: ``none`` (default), ``l1`` or ``inverse``.

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
    if method == "magnitude":
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
    else:
        raise ValueError(f"unknown sparsify method {method!r}")
    return _rescale(delta, delta * keep, density, rescale)


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
        generator: random source for ``random`` sparsification.

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
    return merge_deltas(deltas, weights, steps, densities, gammas, generator).add_(base)


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
) -> torch.Tensor:
    """:func:`merge_task_vectors` on task vectors already taken; **overwrites** ``deltas``.

    For callers that own their ``(k, *shape)`` buffer (the executor), which saves one copy of
    it; returns the combined task vector (without the base).
    """
    normalize_deltas(deltas, steps.delta_norm)
    if steps.sparsify != "none":
        for i in range(deltas.shape[0]):
            density = 1.0 if densities is None else float(densities[i])
            gamma = 0.01 if gammas is None else float(gammas[i])
            deltas[i] = sparsify(
                deltas[i],
                steps.sparsify,
                density=density,
                gamma=gamma,
                generator=generator,
                rescale=steps.rescale,
            )
    for i in range(deltas.shape[0]):
        deltas[i] *= float(weights[i])
    mask = None if steps.elect == "none" else elect(deltas, steps.elect)
    return combine(
        deltas, mask, weights, method=steps.combine, normalize=steps.normalize, scale=steps.scale
    )


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
