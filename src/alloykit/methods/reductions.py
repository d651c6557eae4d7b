"""Sums along the last dimension in an order fixed by the shape alone.

:func:`alloykit.methods.task_vectors.stable_sum` reduces a whole tensor; the methods that need
one value per row (Model Stock's filter-wise cosines, Arcee Fusion's per-row KL divergence) use
:func:`stable_row_sums`, which splits long rows into the same fixed-size chunks, so each
partial sum is done by one thread and the result does not depend on the thread count.
"""

from __future__ import annotations

import torch

# elements per partial sum, as in stable_sum: below torch's parallel grain, so one thread each
_CHUNK = 32768


def stable_row_sums(values: torch.Tensor) -> torch.Tensor:
    """Float64 sums over the last dimension, ``(..., n) -> (...)``, in a fixed order.

    A 0-d tensor is one row of one element (its sum is itself).

    Example:
        >>> stable_row_sums(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([3., 7.], dtype=torch.float64)
    """
    if values.dim() == 0:
        return values.to(torch.float64)
    rows = values.reshape(-1, values.shape[-1]).to(torch.float64)
    while rows.shape[1] > _CHUNK:
        padded = torch.nn.functional.pad(rows, (0, -rows.shape[1] % _CHUNK))
        rows = padded.view(rows.shape[0], -1, _CHUNK).sum(dim=2)
    return rows.sum(dim=1).view(values.shape[:-1])
