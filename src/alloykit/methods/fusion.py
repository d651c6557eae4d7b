"""Two-model fusions that keep the base except where the other model differs in a telling way.

``nearswap`` (from the QuartetAnemoi-70B-t0.0001 model card; MergeKit's ``nearswap``, reference
§1.12) takes the other model where the two are close; ``arcee_fusion`` (Arcee AI; MergeKit's
``arcee_fusion``, reference §1.13) takes the other model's changes where they are large and the
row's output distribution moved most.
"""

from __future__ import annotations

import torch

from alloykit.methods.reductions import stable_row_sums
from alloykit.methods.registry import MethodInputs

# MergeKit's floor on |base − x| in nearswap's t / |base − x|.
DIFFERENCE_FLOOR = 1e-6
# Added to both softmax distributions before the KL divergence, as MergeKit does.
PROBABILITY_FLOOR = 1e-8
# Above this many elements the quantiles come from a sample of this size (MergeKit's limit).
QUANTILE_SAMPLE = 1_000_000


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Nearswap (QuartetAnemoi-70B-t0.0001 card): ``w = clamp(t / max(|base − x|, 1e-6), 0, 1)``.

    ``out = w·x + (1 − w)·base``, elementwise: where the two models are within ``t`` of each
    other the other model is taken whole, farther apart it is blended in less and less.

    Args:
        base: the base model's tensor.
        other: the other model's tensor.
        t: the closeness threshold (``0`` gives the base).

    Returns:
        The merged tensor (new; the arguments are not modified).

    Example:
        >>> nearswap(torch.zeros(3), torch.tensor([0.05, 0.2, -0.4]), 0.1)
        tensor([ 0.0500,  0.1000, -0.1000])
    """
    weight = (t / (base - other).abs().clamp(min=DIFFERENCE_FLOOR)).clamp(0.0, 1.0)
    return weight * other + (1 - weight) * base


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance, float64: ``|x − base| ⊙ KL(softmax(x) ‖ softmax(base))`` per row.

    Softmax and KL run along the last dimension (a 1-D tensor is one row), each distribution
    plus 1e-8; one KL per row, broadcast along the row. All in float64, the KL a sum in a fixed
    order: the KL of two nearly equal rows is a small difference of large terms, and MergeKit's
    float32 sum of them is off by up to ~10% (on its toy golden inputs), enough to move elements
    across the threshold.

    Example:
        >>> fusion_importance(torch.zeros(2, 2), torch.tensor([[1.0, -1.0], [0.5, 0.5]]))
        tensor([[0.3278, 0.3278],
                [0.0000, 0.0000]], dtype=torch.float64)
    """
    rows_base = base.reshape(1) if base.dim() == 0 else base
    rows_other = other.reshape(1) if other.dim() == 0 else other
    rows_base, rows_other = rows_base.to(torch.float64), rows_other.to(torch.float64)
    p = torch.softmax(rows_other, dim=-1) + PROBABILITY_FLOOR
    q = torch.softmax(rows_base, dim=-1) + PROBABILITY_FLOOR
    divergence = stable_row_sums(p * torch.log(p / q))
    importance = (rows_other - rows_base).abs() * divergence.unsqueeze(-1)
    return importance.reshape(base.shape)


def fusion_threshold(
    importance: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``median + 1.5·IQR`` of ``importance``, quantile ``q`` being sorted element ``⌊q·(n−1)⌋``.

    Exact (O(n) selection, no sort) up to 1,000,000 elements, as in MergeKit; above that the
    quantiles come from 1,000,000 elements drawn uniformly with replacement using
    ``generator``, so a seed reproduces the result (MergeKit draws unseeded).

    Example:
        >>> fusion_threshold(torch.arange(9.0))  # q1 = 2, median = 4, q3 = 6: 4 + 1.5·4
        tensor(10.)
    """
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        draws = torch.randint(
            flat.numel(),
            (QUANTILE_SAMPLE,),
            generator=generator,
            device=flat.device,
        )
        flat = flat[draws]
    last = flat.numel() - 1
    # ⌊q·(n−1)⌋ for q = 1/4, 1/2, 3/4 in integers, then the (index + 1)-th smallest value
    lower, middle, upper = (
        torch.kthvalue(flat, index + 1).values for index in (last // 4, last // 2, 3 * last // 4)
    )
    return middle + 1.5 * (upper - lower)


def arcee_fusion(
    base: torch.Tensor, other: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Arcee Fusion (Arcee AI; MergeKit's ``arcee_fusion``): keep only the outstanding changes.

    ``I = |x − base| ⊙ KL_row``; ``out = base + (x − base)·[I ≥ median(I) + 1.5·IQR(I)]``
    (:func:`fusion_importance`, :func:`fusion_threshold`).

    Args:
        base: the base model's tensor.
        other: the other model's tensor.
        generator: random source for the quantile sample of tensors over 1,000,000 elements.

    Returns:
        The merged tensor (new; the arguments are not modified).

    Example:
        >>> other = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 3.0])
        >>> arcee_fusion(torch.zeros(8), other)  # threshold (0.4 + 1.5·(0.6 − 0.2))·KL
        tensor([0., 0., 0., 0., 0., 0., 0., 3.])
    """
    importance = fusion_importance(base, other)
    keep = importance >= fusion_threshold(importance, generator)
    return base + (other - base) * keep


def run_nearswap(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`nearswap` from the base toward the one other model."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return nearswap(inputs.base, inputs.tensors[0], float(inputs.params["t"]))


def run_arcee_fusion(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`arcee_fusion` of the base and the one other model."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return arcee_fusion(inputs.base, inputs.tensors[0], inputs.generator)
