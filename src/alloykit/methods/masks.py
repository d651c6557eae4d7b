"""Mask-based task-vector merges: per-element selection of which task vectors survive.

* **magmax** keeps, per element, the task-vector entry of largest magnitude (Marczak et al.
  2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024,
  arXiv:2407.06322).
* **consensus** builds a TALL mask per task (the entries where the task's own vector outweighs
  what the other tasks add) and keeps only the entries at least ``k`` masks select (Wang et al.
  2024, "Localizing Task Information for Improved Model Merging and Compression", ICML 2024,
  arXiv:2405.07813).

Both loop over the models and keep one running result, so the memory is the inputs plus a
fixed number of tensors of one model's size, whatever the number of models; every result is
elementwise, so it does not depend on the thread count.
"""

from __future__ import annotations

import torch

from alloykit.methods.reductions import sum_in_order
from alloykit.methods.registry import MethodInputs


def magmax(base: torch.Tensor, tensors: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """MagMax: ``base + λ·τ_max`` with ``τ_max[j] = τ_t[j]`` for ``t = argmax_t |τ_t[j]|``.

    Marczak et al. 2024, ECCV, arXiv:2407.06322; task vectors ``τ_t = x_t − base``. Among
    entries of equal magnitude (``+a`` and ``−a``) the larger value wins, so the result does
    not depend on the order of the models (the paper's code lets the later model win).

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)``: the fine-tuned models' tensors.
        scale: λ, the scaling of the selected task vector (default 0.5, the paper's
            reproduction setting as in FusionBench).

    Returns:
        A new tensor of ``base``'s shape and dtype.

    Example:
        >>> tuned = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 1.0, -2.0]])
        >>> magmax(torch.zeros(3), tuned, scale=1.0)
        tensor([-2., -3.,  2.])
    """
    best = tensors[0] - base
    for i in range(1, tensors.shape[0]):
        delta = tensors[i] - base
        larger = delta.abs() > best.abs()
        # equal magnitudes: take the larger value, so the choice is symmetric in the models
        larger |= (delta.abs() == best.abs()) & (delta > best)
        best = torch.where(larger, delta, best)
    return best.mul_(scale).add_(base)


def run_magmax(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`magmax` with the global ``lambda``."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return magmax(inputs.base, inputs.tensors, float(inputs.params["lambda"]))


def tall_masks(deltas: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """TALL masks: ``m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|]`` with ``τ_MTL = Σ_t τ_t``, ``(k, *shape)``.

    Wang et al. 2024, ICML, arXiv:2405.07813 (eq. ``|θ0 − θ_t| ≥ λ_t·|θ_MTL − θ_t|``): an entry
    belongs to task t where the task's own change is at least λ_t times what merging moves it
    by. ``deltas`` are the (weighted) task vectors ``(k, *shape)``; ``lambdas`` is ``(k,)``.

    Example:
        >>> tall_masks(torch.tensor([[1.0, 0.1], [0.2, 1.0]]), torch.tensor([0.6, 0.6])).tolist()
        [[True, False], [False, True]]
    """
    total = sum_in_order(deltas)
    masks = torch.empty(deltas.shape, dtype=torch.bool, device=deltas.device)
    for t in range(deltas.shape[0]):
        rest = total - deltas[t]  # τ_MTL − τ_t: what the other tasks add
        masks[t] = deltas[t].abs() >= rest.abs_().mul_(float(lambdas[t]))
    return masks


def consensus(
    base: torch.Tensor,
    tensors: torch.Tensor,
    weights: torch.Tensor,
    lambdas: torch.Tensor,
    *,
    k: int = 2,
    scale: float = 1.0,
) -> torch.Tensor:
    """Consensus merging: task arithmetic restricted to the entries ≥ ``k`` TALL masks select.

    With ``u_t = w_t·(x_t − base)``, ``τ_MTL = Σ_t u_t``, ``m_t = 1[|u_t| ≥ λ_t·|τ_MTL − u_t|]``:
    ``out = base + λ·1[Σ_t m_t ≥ k] ⊙ τ_MTL`` (Wang et al. 2024, ICML, arXiv:2405.07813; the
    paper's consensus task arithmetic, with unit weights). ``k = 2`` drops the "selfish" entries
    (one task only) and the "catastrophic" ones (no task); ``k = 0`` is plain task arithmetic.

    Args:
        base: the base model's tensor.
        tensors: ``(k_models, *shape)``: the fine-tuned models' tensors.
        weights: ``(k_models,)`` per-model weights ``w_t`` (the paper: 1).
        lambdas: ``(k_models,)`` per-model TALL-mask thresholds ``λ_t`` (FusionBench: 0.6;
            the paper picks each from {0.2, …, 0.6} on validation data).
        k: how many masks must select an entry for it to be kept (default 2).
        scale: λ, scales the kept task vector (default 1.0).

    Returns:
        A new tensor of ``base``'s shape and dtype.

    Example:
        Entry 0 is selected by two masks and kept; entries 1 and 2 by one mask each (selfish):

        >>> tuned = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        >>> consensus(torch.zeros(3), tuned, torch.ones(3), torch.full((3,), 0.6))
        tensor([2., 0., 0.])
    """
    deltas = tensors - base
    for t in range(deltas.shape[0]):
        deltas[t] *= float(weights[t])
    masks = tall_masks(deltas, lambdas)
    votes = masks.sum(dim=0)  # integer counts: exact in any order
    merged = sum_in_order(deltas)
    merged *= votes >= k
    return merged.mul_(scale).add_(base)


def run_consensus(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`consensus` with per-model ``weight``, ``tall_lambda``."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return consensus(
        inputs.base,
        inputs.tensors,
        inputs.per_model["weight"],
        inputs.per_model["tall_lambda"],
        k=int(inputs.params["k"]),
        scale=float(inputs.params["lambda"]),
    )
