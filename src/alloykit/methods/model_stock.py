"""Model Stock: interpolate between the base and the fine-tunes' average by their agreement.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024),
arXiv:2403.19522; MergeKit's ``model_stock`` (reference §1.9).
"""

from __future__ import annotations

import torch

from alloykit.methods.reductions import stable_row_sums, sum_in_order
from alloykit.methods.registry import MethodInputs

# MergeKit's floor on the product of two offsets' norms: a zero offset then has cosine 0.
NORM_PRODUCT_FLOOR = 1e-6


def _as_rows(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """``(rows, n)`` view: rows along the last dimension when filter-wise, else one row."""
    if filter_wise and tensor.dim() >= 2:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.reshape(1, -1)


def model_stock_ratio(
    base: torch.Tensor, tensors: torch.Tensor, *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock's interpolation ratio ``t``, float64: shape ``(rows,)``, or ``(1,)``.

    ``o_i = x_i − base``; ``cos θ`` is the mean over pairs ``i < j`` of
    ``clamp(<o_i, o_j> / max(‖o_i‖·‖o_j‖, 1e-6), −1, 1)``; ``t = N·cos θ / (1 + (N−1)·cos θ)``
    with ``N`` the number of fine-tunes. One ``t`` per row (last dimension) when
    ``filter_wise``, else one for the whole tensor. Dot products are float64 sums in a fixed
    order.

    Example:
        >>> base = torch.zeros(2)
        >>> model_stock_ratio(base, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([0.8284], dtype=torch.float64)
    """
    count = tensors.shape[0]
    if count < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {count}")
    offsets = [_as_rows(tensors[i] - base, filter_wise) for i in range(count)]
    norms = [stable_row_sums(offset * offset).sqrt() for offset in offsets]
    cosine_total = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(count):
        for j in range(i + 1, count):
            dot = stable_row_sums(offsets[i] * offsets[j])
            product = (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_FLOOR)
            cosine_total += (dot / product).clamp(-1.0, 1.0)
            pairs += 1
    cosine = cosine_total / pairs
    # The paper's t = k·cos φ / ((k − 1)·cos φ + 1); not clamped, as in MergeKit.
    return count * cosine / (1 + (count - 1) * cosine)


def model_stock(
    base: torch.Tensor, tensors: torch.Tensor, *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): ``out = t·mean_i(x_i) + (1−t)·base``.

    ``t`` from :func:`model_stock_ratio`: 1 when the fine-tunes' offsets from the base point the
    same way (their average is kept), 0 when they are orthogonal (the base is kept).

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)``, ``k >= 2`` fine-tunes of the base.
        filter_wise: one ratio per row (last dimension) instead of one per tensor.

    Returns:
        The merged tensor, in ``base``'s dtype.

    Example:
        >>> base = torch.zeros(2)
        >>> model_stock(base, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))  # orthogonal: t = 0
        tensor([0., 0.])
        >>> model_stock(base, torch.tensor([[1.0, 1.0], [3.0, 3.0]]))  # aligned: t = 1
        tensor([2., 2.])
    """
    ratio = model_stock_ratio(base, tensors, filter_wise=filter_wise).to(base.dtype)
    # added in a fixed order: the average does not depend on threads
    average = _as_rows(sum_in_order(tensors) / tensors.shape[0], filter_wise)
    ratio = ratio.unsqueeze(-1)  # one per row, broadcast along it
    merged = ratio * average + (1 - ratio) * _as_rows(base, filter_wise)
    return merged.reshape(base.shape)


def run_model_stock(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`model_stock` of the fine-tunes around the base."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return model_stock(inputs.base, inputs.tensors, filter_wise=bool(inputs.params["filter_wise"]))
