"""Task-vector methods: merges of the differences between each fine-tune and the base.

A task vector is ``δ_i = x_i − base`` (Ilharco et al. 2023, "Editing models with task
arithmetic", arXiv:2212.04089). The methods in this family are compositions of three steps:
sparsify each task vector, elect a sign consensus, combine. This module holds the steps and
the presets built from them.
"""

from __future__ import annotations

import torch

from alloykit.methods.registry import MethodInputs

# MergeKit treats a weight sum below this as zero and then does not divide (reference §1.2).
ZERO_WEIGHT_SUM = 1e-8


def combine_sum(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    normalize: bool,
    scale: float = 1.0,
) -> torch.Tensor:
    """Combine step: ``λ · Σ_i w_i·δ_i`` (divided by ``Σ_i w_i`` when ``normalize``).

    A weight sum whose magnitude is below 1e-8 is not divided by (MergeKit's rule), so
    weights such as ``[1, -1]`` give the plain difference of two task vectors.

    Args:
        deltas: ``(k, *shape)``: one task vector per model.
        weights: ``(k,)`` per-model weights; a negative weight subtracts that task vector.
        normalize: divide by the sum of the weights.
        scale: λ, multiplies the combined task vector (default 1.0).

    Returns:
        The combined task vector, ``shape``.

    Example:
        >>> d = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> combine_sum(d, torch.tensor([1.0, 0.5]), normalize=False)
        tensor([1., 1.])
    """
    out = torch.zeros_like(deltas[0])
    for i in range(deltas.shape[0]):  # fixed order: the result does not depend on threads
        weight = float(weights[i])
        if weight != 0.0:
            out.add_(deltas[i], alpha=weight)
    divisor = float(weights.sum())
    if normalize and abs(divisor) >= ZERO_WEIGHT_SUM:
        out.div_(divisor)
    if scale != 1.0:
        out.mul_(scale)
    return out


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
    paper's "forgetting via negation"). MergeKit's ``task_arithmetic``: ``lambda`` 1.0,
    ``normalize`` false.

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)``: the fine-tuned models' tensors.
        weights: ``(k,)`` per-model weights.
        normalize: divide the weighted sum by ``Σ w_i`` (default False).
        scale: λ (default 1.0).

    Returns:
        The merged tensor.

    Example:
        >>> b = torch.zeros(2)
        >>> task_arithmetic(b, torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([1.0, -1.0]))
        tensor([-1.,  1.])
    """
    deltas = tensors - base  # (k, *shape): one task vector per model
    return base + combine_sum(deltas, weights, normalize=normalize, scale=scale)


def run_task_arithmetic(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`task_arithmetic` on a job's inputs."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    deltas = inputs.tensors.sub_(inputs.base)  # in place: the stack is this call's own
    combined = combine_sum(
        deltas,
        inputs.per_model["weight"],
        normalize=bool(inputs.params["normalize"]),
        scale=float(inputs.params["lambda"]),
    )
    return combined.add_(inputs.base)
