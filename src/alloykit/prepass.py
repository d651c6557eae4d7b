"""Whole-model statistics some options need before the merge pass: model-wide top-k.

The TIES paper's code trims each task vector to its top-k entries over the *whole model*
(Yadav et al. 2023, arXiv:2306.01708), where MergeKit trims each tensor on its own. With
``density_scope: model`` alloykit does the former, exactly and without holding a model:

1. stream every job once and histogram, per model, the bit patterns of ``|δ|`` (a
   non-negative float's bits order like its value), then find the bucket holding the k-th
   largest magnitude, ``k = max(1, int(density·N))`` over the model's N merged entries;
2. stream again, keeping only the entries in that bucket (a small share of the model), and
   take the exact k-th largest among them with ``kthvalue``: the model's threshold ``T``.

Entries above ``T`` are kept; of those equal to ``T``, the first ones in plan order and then
flat index, so exactly k are kept. Each job then carries, per model, ``threshold`` and
``tie_quota`` (how many of its entries equal to ``T`` it keeps) as per-model values, and the
kernel masks with them instead of its own per-tensor top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from alloykit.errors import ConfigError
from alloykit.methods import Method
from alloykit.methods.task_vectors import normalize_deltas
from alloykit.plan import COPY, TensorJob

# (job) -> (k, *shape) inputs and the base, in working precision, as the merge pass loads them
Loader = Callable[[TensorJob], tuple[torch.Tensor, torch.Tensor | None]]
_MANTISSA_KEPT = 7  # bucket = 1/128 of a binade


def needs_model_scope(kernel: Method, jobs: Sequence[TensorJob]) -> bool:
    """Whether any merged job asks for model-wide top-k."""
    return kernel.param("density_scope") is not None and any(
        j.method != COPY and j.params.get("density_scope") == "model" for j in jobs
    )


def _keys(magnitude: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bit patterns of non-negative magnitudes as int64, and the shift to their bucket."""
    if magnitude.dtype == torch.float64:
        return magnitude.reshape(-1).view(torch.int64), 52 - _MANTISSA_KEPT
    return magnitude.reshape(-1).view(torch.int32).long(), 23 - _MANTISSA_KEPT


def _buckets(shift: int) -> int:
    """How many buckets the bit patterns of one float width fall into."""
    return (1 << (63 if shift > 16 else 31)) >> shift


def _deltas(job: TensorJob, load: Loader) -> torch.Tensor:
    """The job's task vectors exactly as the merge pass computes them before sparsifying."""
    tensors, base = load(job)
    assert base is not None  # task-vector methods require a base
    deltas = tensors.sub_(base)
    return normalize_deltas(deltas, job.params.get("delta_norm", "none"))


def with_model_thresholds(jobs: Sequence[TensorJob], load: Loader) -> list[TensorJob]:
    """``jobs`` with per-model ``threshold`` and ``tie_quota`` for model-wide top-k."""
    merged = [j for j in jobs if j.method != COPY and j.params.get("density_scope") == "model"]
    models = sorted({i.model for j in merged for i in j.inputs})
    density: dict[str, float] = {}
    for job in merged:
        for item, value in zip(job.inputs, job.per_model["density"], strict=True):
            if density.setdefault(item.model, value) != value:
                raise ConfigError(
                    f"density_scope: model needs one density per model, but '{item.model}' has "
                    f"{density[item.model]:g} and {value:g} on different tensors; give it one "
                    "density or use density_scope: tensor"
                )

    # pass 1: per-model histograms of the magnitudes' buckets
    histograms: dict[str, torch.Tensor] = {}
    totals = dict.fromkeys(models, 0)
    shift = 0
    for job in merged:
        deltas = _deltas(job, load)
        for row, item in enumerate(job.inputs):
            keys, shift = _keys(deltas[row].abs())
            counts = torch.bincount(keys >> shift, minlength=_buckets(shift))
            previous = histograms.get(item.model)
            histograms[item.model] = counts if previous is None else previous + counts
            totals[item.model] += keys.numel()
    wanted = {m: max(1, int(density[m] * totals[m])) for m in models}
    bucket, above_bucket = {}, {}
    for model in models:
        from_top = torch.cumsum(histograms[model].flip(0), dim=0)
        index = int(torch.searchsorted(from_top, wanted[model]))  # first cumulative >= k
        bucket[model] = histograms[model].numel() - 1 - index
        above_bucket[model] = int(from_top[index - 1]) if index > 0 else 0

    # pass 2: the entries of the threshold's bucket, per model, in plan order
    members: dict[str, list[torch.Tensor]] = {m: [] for m in models}
    for job in merged:
        deltas = _deltas(job, load)
        for row, item in enumerate(job.inputs):
            keys, _ = _keys(deltas[row].abs())
            members[item.model].append(keys[(keys >> shift) == bucket[item.model]])
    thresholds, quota_left = {}, {}
    for model in models:
        values = torch.cat(members[model])
        inside = wanted[model] - above_bucket[model]  # how many of the bucket are kept
        key = int(torch.kthvalue(values, values.numel() - inside + 1).values)
        thresholds[model] = key
        quota_left[model] = inside - int(torch.count_nonzero(values > key))

    # per job: the threshold and how many of its ties to T it keeps (first come, first kept)
    out = []
    chosen = {id(j) for j in merged}
    for job in jobs:
        if id(job) not in chosen:
            out.append(job)
            continue
        threshold, quota = [], []
        for item in job.inputs:
            ties = int(torch.count_nonzero(members[item.model].pop(0) == thresholds[item.model]))
            take = min(ties, quota_left[item.model])
            quota_left[item.model] -= take
            threshold.append(_key_value(thresholds[item.model], shift))
            quota.append(float(take))
        per_model = {**job.per_model, "threshold": tuple(threshold), "tie_quota": tuple(quota)}
        out.append(replace(job, per_model=per_model))
    return out


def _key_value(key: int, shift: int) -> float:
    """The float whose bit pattern is ``key`` (float64 when the shift says so)."""
    if shift > 16:
        return float(torch.tensor(key, dtype=torch.int64).view(torch.float64))
    return float(torch.tensor(key, dtype=torch.int32).view(torch.float32))
