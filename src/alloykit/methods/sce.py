"""SCE: select high-variance positions, weight task vectors by their size, erase minority signs.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990 (the SCE merge:
Select, Calculate, Erase); MergeKit's ``sce`` (reference §1.10).
"""

from __future__ import annotations

import torch

from alloykit.methods.registry import MethodInputs
from alloykit.methods.task_vectors import elect, stable_sum, top_mask

# MergeKit: a total mean square below this counts as zero (then every model weighs 1/k) ...
ZERO_WEIGHT_TOTAL = 1e-6
# ... and the elementwise divisor Σ s_i·m_i is at least this.
DIVISOR_FLOOR = 1e-6


def variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Select step: the positions where the task vectors vary most, ``(*shape)`` bool.

    ``var = Var_i(δ_i)`` (population variance over the models) per position; keeps the
    ``int(select_topk·count_nonzero(var))`` largest, ties to the lower flat index (O(n)
    selection, no sort). ``select_topk >= 1`` keeps every position.

    Example:
        >>> variance_mask(torch.tensor([[0.0, 1.0, 3.0], [0.0, -1.0, 3.5]]), 0.5).tolist()
        [False, True, False]
    """
    if select_topk >= 1:
        return torch.ones_like(deltas[0], dtype=torch.bool)
    count = deltas.shape[0]
    # Var = Σ_(i<j) (δ_i − δ_j)² / k²: exactly zero where the models agree, which the
    # mean-based formula misses by a rounding error (and those zeros are not counted).
    spread = torch.zeros_like(deltas[0])
    for i in range(count):
        for j in range(i + 1, count):
            spread += (deltas[i] - deltas[j]).square()
    variance = spread / (count * count)
    keep = int(select_topk * int(torch.count_nonzero(variance)))
    return top_mask(variance, keep)


def size_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Calculate step: ``s_i = mean(δ_i²) / Σ_j mean(δ_j²)``, float64 ``(k,)``.

    Uniform ``1/k`` when the total is below 1e-6 (MergeKit's rule). Sums in a fixed order.

    Example:
        >>> size_weights(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
        tensor([0.3333, 0.6667], dtype=torch.float64)
    """
    count = deltas.shape[0]
    squares = [stable_sum(delta.square()) / delta.numel() for delta in deltas]
    total = sum(squares)
    if abs(total) < ZERO_WEIGHT_TOTAL:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    return torch.tensor(squares, dtype=torch.float64) / total


def sce(base: torch.Tensor, tensors: torch.Tensor, *, select_topk: float = 1.0) -> torch.Tensor:
    """SCE merge (Wan et al. 2024, FuseChat, arXiv:2408.07990).

    ``δ_i = (x_i − base)·mask_τ`` (the top ``τ = select_topk`` of positions by variance over the
    models); ``m_i``: ``δ_i`` agrees with ``sign(Σ_j δ_j)`` (TIES election, unweighted);
    ``out = base + Σ_i s_i·m_i·δ_i / max(Σ_i s_i·m_i, 1e-6)``, ``s_i`` from
    :func:`size_weights` (computed after the selection).

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)`` fine-tunes of the base.
        select_topk: fraction of the positions with nonzero variance kept, in [0, 1].

    Returns:
        The merged tensor (new; the arguments are not modified).

    Example:
        >>> base = torch.zeros(2)
        >>> sce(base, torch.tensor([[1.0, 1.0], [3.0, -1.0]]))  # s = (1/6, 5/6)
        tensor([2.6667, 1.0000])
    """
    deltas = tensors - base
    if select_topk < 1:
        deltas *= variance_mask(deltas, select_topk)
    weights = size_weights(deltas)
    agree = elect(deltas, "mass")
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for i in range(deltas.shape[0]):  # fixed order: the result does not depend on threads
        weight = float(weights[i])
        merged += deltas[i] * agree[i] * weight
        divisor += agree[i].to(base.dtype) * weight
    return base + merged / divisor.clamp(min=DIVISOR_FLOOR)


def run_sce(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`sce` of the fine-tunes around the base."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return sce(inputs.base, inputs.tensors, select_topk=float(inputs.params["select_topk"]))
