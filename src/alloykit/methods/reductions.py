"""Sums in an order fixed by the shape alone, so results do not depend on the thread count.

:func:`stable_row_sums` gives one value per row (Model Stock's filter-wise cosines, Arcee
Fusion's per-row KL divergence, the spherical methods' norms);
:func:`alloykit.methods.task_vectors.stable_sum` is the same on the flattened tensor. Long rows
are split into fixed-size chunks, so each partial sum is done by one thread.
:func:`sum_in_order` adds the models of a ``(k, *shape)`` stack elementwise in index order.
"""

from __future__ import annotations

import torch

# elements per partial sum: strictly below torch's parallel grain (32768), so one thread each
PARTIAL_SUM = 8192
_CHUNK = PARTIAL_SUM


def stable_row_sums(values: torch.Tensor) -> torch.Tensor:
    """Float64 sums over the last dimension, ``(..., n) -> (...)``, in a fixed order.

    A 0-d tensor is one row of one element (its sum is itself).

    Example:
        >>> stable_row_sums(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([3., 7.], dtype=torch.float64)
    """
    if values.dim() == 0:
        return values.to(torch.float64)
    if values.shape[-1] == 0:  # empty rows sum to zero (reshape cannot infer their count)
        return torch.zeros(values.shape[:-1], dtype=torch.float64, device=values.device)
    rows = values.reshape(-1, values.shape[-1]).to(torch.float64)
    while rows.shape[1] > _CHUNK:
        padded = torch.nn.functional.pad(rows, (0, -rows.shape[1] % _CHUNK))
        rows = padded.view(rows.shape[0], -1, _CHUNK).sum(dim=2)
    return rows.sum(dim=1).view(values.shape[:-1])


def sum_in_order(stack: torch.Tensor) -> torch.Tensor:
    """``Σ_i stack[i]`` added in index order (a new tensor), so every element's rounding is
    fixed whatever the thread count.

    Example:
        >>> sum_in_order(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([4., 6.])
    """
    total = stack[0].clone()
    for row in stack[1:]:
        total += row
    return total
