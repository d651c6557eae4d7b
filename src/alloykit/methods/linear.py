"""Weighted averaging of whole weights: model soups and MergeKit's ``linear``."""

from __future__ import annotations

import torch

from alloykit.methods.registry import MethodInputs
from alloykit.methods.task_vectors import blocks


def linear(tensors: torch.Tensor, weights: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Weighted sum of the inputs, divided by the sum of the weights when ``normalize``.

    ``out = Σ_i w_i·x_i / Σ_i w_i`` (Wortsman et al. 2022, "Model soups", arXiv:2203.05482;
    MergeKit's ``linear``).

    The sum is taken around the first input, ``x_0 + Σ_{i≥1} (w_i/W)(x_i − x_0)``, which is
    the same number in exact arithmetic, loses less precision when the models are close (as
    fine-tunes of one base are), and returns ``x_0`` bit for bit when every input is ``x_0``.
    The loop over models runs in a fixed order, so the result does not depend on threads.

    Args:
        tensors: ``(k, *shape)``: one row per input model, in working precision.
        weights: ``(k,)`` per-model weights; negative weights are allowed.
        normalize: divide by ``Σ w_i`` (default True). The caller rejects a zero sum.

    Returns:
        The merged tensor, ``shape``, same dtype as ``tensors``.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> linear(x, torch.tensor([1.0, 3.0]))
        tensor([2.5000, 3.5000])
    """
    total = float(weights.sum())
    first = tensors[0]
    # 1) the anchor term: Σ_i c_i times x_0, which is x_0 itself when normalising
    out = first.clone() if normalize else first * total
    # 2) the weighted differences from the anchor, block by block (bounded temporaries)
    flat, rows = out.view(-1), tensors.reshape(tensors.shape[0], -1)
    for i in range(1, tensors.shape[0]):
        coefficient = float(weights[i]) / total if normalize else float(weights[i])
        if coefficient != 0.0:
            for block in blocks(flat.numel()):
                flat[block].add_(rows[i, block] - rows[0, block], alpha=coefficient)
    return out


def run_linear(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`linear` on a job's inputs."""
    return linear(
        inputs.tensors, inputs.per_model["weight"], normalize=bool(inputs.params["normalize"])
    )
