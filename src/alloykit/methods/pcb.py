"""PCB-merging: per-entry coefficients from parameter competition within and across tasks.

Du et al. 2024, "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
arXiv:2410.02396. Each task vector entry gets a score from *intra-balancing* (its magnitude
among its own task's entries, exponentially sharpened by the number of tasks) times
*inter-balancing* (how much it agrees with the other tasks); the entries below a task's
top-``r`` scores are dropped, the rest rescaled to [0, 1], and the merge is the score-weighted
average of the task vectors.

The paper's equations and the authors' released implementation differ in details (the paper
writes inter-balancing as a sum of softmaxes of normalised pairwise products; the released
``pcb-merging.py``, which the authors' README names as "the details of our method", uses
``tanh`` of the products and clips outliers first). We follow the released ``pcb-merging.py``
step for step, since that is what produced the paper's numbers; the differences are listed
in docs/methods.md. Scope: one tensor at a time (the authors flatten the whole model into
one row per task; per tensor is how MergeKit scopes TIES-style selection too).
"""

from __future__ import annotations

import torch

from alloykit.methods.reductions import sum_in_order
from alloykit.methods.registry import MethodInputs


def _order_statistic(rows: torch.Tensor, index: int) -> torch.Tensor:
    """``sorted(row)[index]`` for every row of a ``(k, d)`` tensor, as ``(k, 1)``; O(d), no sort."""
    return torch.kthvalue(rows, index + 1, dim=1, keepdim=True).values


def _min_max(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(rows − low) / (high − low)`` per row; a row with ``high == low`` maps to zeros."""
    span = high - low
    flat = span == 0
    return (rows - low) / torch.where(flat, torch.ones_like(span), span) * ~flat


def pcb_scores(
    deltas: torch.Tensor, ratio: float, clamp_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped task vectors and PCB's per-entry scales, both ``(k, d)``.

    With ``a_i = clip(|τ_i|, q_i(c), q_i(1 − c))`` (``q_i(p)``: the row's order statistic at
    index ``⌊d·p⌋``; the upper one at ``⌊d·(1 − c)⌋ − 1``, as in the released code, which
    is ``d − 2`` whenever ``d·c < 1``: a tensor of fewer than ``1/c`` entries always has its
    largest magnitude clipped to its second largest):

    * intra-balancing ``β_intra,i = exp(k · minmax(a_i)²)``;
    * inter-balancing ``β_inter,i = tanh(τ_i ⊙ Σ_j τ_j)`` (unclipped task vectors);
    * ``β_i = β_intra,i ⊙ β_inter,i``; drop and rescale:
      ``s_i = minmax(max(β_i, t_i))`` with ``t_i = sorted(β_i)[⌊d·(1 − r)⌋]``, so the entries
      at or below the threshold get 0 and the largest gets 1.

    ``minmax`` rescales a row to [0, 1]; a row whose values are all equal maps to 0 in
    intra-balancing (every entry equally important: ``exp(0) = 1``) and, in the drop step, to
    1 at the row's maximum and 0 elsewhere (the entries the top-``r`` selects keep full
    weight). The released code divides by zero there. ``exp`` is evaluated as
    ``exp(k·(m² − 1))``, the same scores up to a per-row factor that the final ``minmax``
    removes, so many tasks do not overflow float32.

    Args:
        deltas: ``(k, d)`` task vectors.
        ratio: r, the share of each task's entries kept (0 < r ≤ 1).
        clamp_ratio: c, the share of each task's smallest and largest magnitudes clipped.

    Returns:
        ``(clipped task vectors, scales)``.
    """
    k, d = deltas.shape
    magnitudes = deltas.abs()
    low = _order_statistic(magnitudes, min(int(d * clamp_ratio), d - 1))
    high = _order_statistic(magnitudes, max(int(d * (1 - clamp_ratio)) - 1, 0))
    clipped = torch.minimum(torch.maximum(magnitudes, low), high)
    clipped_deltas = torch.sign(deltas) * clipped

    intra = _min_max(clipped, low, high).square_().sub_(1.0).mul_(k).exp_()
    inter = torch.tanh(deltas * sum_in_order(deltas))
    balance = intra.mul_(inter)

    threshold = _order_statistic(balance, min(int(d * (1 - ratio)), d - 1))
    top = balance.amax(dim=1, keepdim=True)
    scales = _min_max(torch.maximum(balance, threshold), threshold, top)
    degenerate = (top == threshold).expand_as(balance)
    scales = torch.where(degenerate, (balance >= threshold).to(scales.dtype), scales)
    return clipped_deltas, scales


def pcb(
    base: torch.Tensor,
    tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    ratio: float = 0.1,
    clamp_ratio: float = 0.0001,
    scale: float = 1.0,
) -> torch.Tensor:
    """PCB-merging: ``base + λ·Σ_i w_i·s_i ⊙ τ̂_i / max(Σ_i s_i, 1e−12)``.

    ``τ̂_i`` are the clipped task vectors and ``s_i`` the drop-and-rescale scales of
    :func:`pcb_scores` (Du et al. 2024, NeurIPS, arXiv:2410.02396; the released
    ``pcb-merging.py``). ``w_i`` are the per-task coefficients the authors' evolutionary
    search tunes (1 by default; the search keeps them in [0.8, 1.3]).

    Args:
        base: the base model's tensor.
        tensors: ``(k, *shape)``: the fine-tuned models' tensors.
        weights: ``(k,)`` per-task coefficients ``w_i``.
        ratio: r, the share of each task's entries kept (the authors' default 0.1).
        clamp_ratio: c, the share of smallest and largest magnitudes clipped (0.0001).
        scale: λ, scales the merged task vector.

    Returns:
        A new tensor of ``base``'s shape and dtype.

    Example:
        Two tasks, four entries, keep everything but each task's weakest entry:

        >>> tuned = torch.tensor([[0.4, -0.1, 0.2, 0.3], [0.2, 0.1, 0.2, -0.3]])
        >>> out = pcb(torch.zeros(4), tuned, torch.ones(2), ratio=0.75, clamp_ratio=0.0)
        >>> [round(v, 6) for v in out.tolist()]
        [0.3, 0.0, 0.2, 0.0]

        Entry 0 is each task's top score (scale 1 in both): the mean of 0.4 and 0.2. Entry 2
        has scales 0.057 and 0.668 but equal values, so it stays 0.2. Entries 1 and 3 cancel
        across the tasks (``tanh`` of a zero sum): score 0, dropped.
    """
    k = tensors.shape[0]
    deltas = (tensors - base).reshape(k, -1)
    clipped, scales = pcb_scores(deltas, ratio, clamp_ratio)
    numerator = clipped[0] * scales[0] * float(weights[0])
    for i in range(1, k):
        numerator += clipped[i] * scales[i] * float(weights[i])
    merged = numerator / sum_in_order(scales).clamp_(min=1e-12)
    return merged.reshape(base.shape).mul_(scale).add_(base)


def run_pcb(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`pcb` with per-model ``weight`` and global ``pcb_ratio``,
    ``clamp_ratio`` and ``lambda``."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return pcb(
        inputs.base,
        inputs.tensors,
        inputs.per_model["weight"],
        ratio=float(inputs.params["pcb_ratio"]),
        clamp_ratio=float(inputs.params["clamp_ratio"]),
        scale=float(inputs.params["lambda"]),
    )
