"""RAM and RAM+ (tensor-local): sum the changes one model alone made, average the shared ones.

Reinforced Agent Merging (Yuan, Shi, Zhang, Liu, Yao, Vosoughi, Lee 2026, "Behavior Knowledge
Merge in Reinforced Agentic Models", arXiv:2601.13572); MergeKit's ``ram`` and ``ramplus_tl``
(reference §1.11). An entry of a task vector ``δ_i = x_i − base`` is *active* when
``|δ_i| > epsilon``; a position changed by exactly one model is *unique*, by more than one
*shared*. Inactive entries never contribute, so a position no model changed keeps the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alloykit.methods.registry import MethodInputs


@dataclass(frozen=True)
class Activity:
    """Which task-vector entries are active, and where they are unique or shared."""

    active: torch.Tensor  # (k, *shape) bool: |δ_i| > epsilon
    count: torch.Tensor  # (*shape): how many models are active at each position
    unique: torch.Tensor  # (*shape) bool: count == 1
    shared: torch.Tensor  # (*shape) bool: count > 1


def activity(deltas: torch.Tensor, epsilon: float) -> Activity:
    """The active entries of ``deltas`` (``(k, *shape)``) and their per-position counts.

    Example:
        >>> found = activity(torch.tensor([[0.5, 0.0, 0.2], [0.3, 0.0, 0.0]]), 1e-5)
        >>> found.unique.tolist(), found.shared.tolist()
        ([False, False, True], [True, False, False])
    """
    active = deltas.abs() > epsilon
    count = torch.zeros(deltas.shape[1:], dtype=torch.int64, device=deltas.device)
    for row in active:
        count += row
    return Activity(active, count, count == 1, count > 1)


def _shared_average(deltas: torch.Tensor, found: Activity) -> torch.Tensor:
    """``Σ_i a_i·δ_i / c`` where shared, 0 elsewhere; sums in a fixed order."""
    total = torch.zeros_like(deltas[0])
    for i in range(deltas.shape[0]):
        total += deltas[i] * (found.active[i] & found.shared)
    return total / found.count.clamp(min=1).to(total.dtype)


def ram(base: torch.Tensor, tensors: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM (Reinforced Agent Merging, arXiv:2601.13572).

    ``a_i = |δ_i| > epsilon``, ``c = Σ_i a_i``;
    ``out = base + Σ_i a_i·δ_i`` where ``c = 1`` (a unique change is taken whole) and
    ``base + Σ_i a_i·δ_i / c`` where ``c > 1`` (shared changes are averaged).

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)`` fine-tunes of the base.
        epsilon: an entry counts as changed when ``|δ| > epsilon``.

    Returns:
        The merged tensor (new; the arguments are not modified).

    Example:
        >>> base = torch.zeros(3)
        >>> ram(base, torch.tensor([[0.4, 0.0, 1.0], [0.2, 0.0, 0.0]]))
        tensor([0.3000, 0.0000, 1.0000])
    """
    deltas = tensors - base
    found = activity(deltas, epsilon)
    unique = torch.zeros_like(base)
    for i in range(deltas.shape[0]):  # fixed order: the result does not depend on threads
        unique += deltas[i] * (found.active[i] & found.unique)
    return base + unique + _shared_average(deltas, found)


def unique_scales(
    found: Activity, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """RAM+'s per-model scale of its unique changes, float64 ``(k,)``.

    ``ρ_i = |a_i ∧ shared| / max(|a_i ∧ unique|, epsilon)`` (counts of positions);
    ``λ_i = 1 + r·clamp(ρ_i, 0, alpha)``: a model whose changes are mostly shared with others
    gets its few unique changes amplified.

    Example:
        >>> found = activity(torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.0, 0.0]]), 1e-5)
        >>> unique_scales(found, r=0.5, alpha=1.0)  # ρ = (1/2, 1/1e-5)
        tensor([1.2500, 1.5000], dtype=torch.float64)
    """
    scales = []
    for active in found.active:
        shared = int(torch.count_nonzero(active & found.shared))
        unique = int(torch.count_nonzero(active & found.unique))
        floor = max(unique, epsilon)
        # epsilon = 0 and no unique entry: λ_i scales nothing, any value does (MergeKit: NaN)
        ratio = shared / floor if floor > 0 else 0.0
        scales.append(1 + r * min(max(ratio, 0.0), alpha))
    return torch.tensor(scales, dtype=torch.float64)


def ramplus_tl(
    base: torch.Tensor,
    tensors: torch.Tensor,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM+, tensor-local (arXiv:2601.13572; MergeKit's ``ramplus_tl``).

    As :func:`ram`, but model ``i``'s unique changes are multiplied by
    ``λ_i = 1 + r·clamp(ρ_i, 0, alpha)``, ``ρ_i`` the ratio of its shared to its unique active
    positions in this tensor (:func:`unique_scales`).

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)`` fine-tunes of the base.
        r: how strongly unique changes are amplified.
        alpha: cap on the ratio ``ρ_i``.
        epsilon: an entry counts as changed when ``|δ| > epsilon``; also the floor of the
            unique count in ``ρ_i``.

    Returns:
        The merged tensor (new; the arguments are not modified).

    Example:
        >>> base = torch.zeros(3)
        >>> ramplus_tl(base, torch.tensor([[0.4, 0.0, 1.0], [0.2, 0.0, 0.0]]), r=0.5, alpha=1.0)
        tensor([0.3000, 0.0000, 1.5000])
    """
    deltas = tensors - base
    found = activity(deltas, epsilon)
    scales = unique_scales(found, r=r, alpha=alpha, epsilon=epsilon)
    unique = torch.zeros_like(base)
    for i in range(deltas.shape[0]):  # fixed order: the result does not depend on threads
        unique += deltas[i] * (found.active[i] & found.unique) * float(scales[i])
    return base + unique + _shared_average(deltas, found)


def run_ram(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`ram` of the fine-tunes around the base."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return ram(inputs.base, inputs.tensors, epsilon=float(inputs.params["epsilon"]))


def run_ramplus_tl(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`ramplus_tl` of the fine-tunes around the base."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    params = inputs.params
    return ramplus_tl(
        inputs.base,
        inputs.tensors,
        r=float(params["r"]),
        alpha=float(params["alpha"]),
        epsilon=float(params["epsilon"]),
    )
