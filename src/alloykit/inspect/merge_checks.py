"""The cheap checks ``alloykit merge`` runs by default, and the warnings they give.

Two kinds: from the plan alone (effective coefficients far from one), and from the tensors the
merge reads anyway (task-vector norms, a model that does not share the base, a task vector of
zeros). The second kind watches each job's inputs as the executor hands them to the method:
a few sums per model and tensor, no extra read and no extra tensor kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from alloykit.inspect.stats import NOT_SHARED_COSINE, NOT_SHARED_RELATIVE, shares_base
from alloykit.methods.task_vectors import blocks, fused_loops
from alloykit.plan import COPY, MergePlan, TensorJob

# Σ w·λ outside this range, with normalize off, is "far from one": the merged change is more
# than twice, or less than half, a single fine-tune's.
COEFFICIENT_RANGE = (0.5, 2.0)
NORM_RATIO = 10.0  # task-vector norms differing by more than this suggest delta_norm


def coefficient_warnings(plan: MergePlan) -> list[str]:
    """Warn when ``Σ_i w_i·λ`` is far from one in some tensor and the method does not normalize.

    Applies to methods with per-model ``weight`` and a ``normalize`` parameter (task arithmetic,
    the TIES/DARE family, linear); nothing is said when ``normalize`` is on.
    """
    kernel = plan.kernel
    if kernel.param("weight") is None or kernel.param("normalize") is None:
        return []
    low, high = COEFFICIENT_RANGE
    far: dict[float, list[TensorJob]] = {}
    for job in plan.jobs:
        if job.method == COPY or job.params.get("normalize") or "weight" not in job.per_model:
            continue
        total = sum(job.per_model["weight"]) * float(job.params.get("lambda", 1.0))
        if not low <= total <= high:
            far.setdefault(round(total, 6), []).append(job)
    if not far:
        return []
    values = sorted(far)
    shown = ", ".join(f"{v:g}" for v in values[:3]) + (", ..." if len(values) > 3 else "")
    count = sum(len(jobs) for jobs in far.values())
    return [
        f"effective task-vector coefficient Σ weight·lambda is {shown} (in {count} of "
        f"{len(plan.jobs)} tensors) with normalize off: the merged change is that many times a "
        "single model's; scale the weights or lambda so it is near 1, or set normalize: true"
    ]


def _square_norm(values: torch.Tensor) -> float:
    """``‖values‖²``, block by block (see :func:`_dot`)."""
    flat = values.reshape(-1)
    return _dot(flat, flat)


def _dot(first: torch.Tensor, second: torch.Tensor) -> float:
    """``<first, second>`` of two 1-D tensors: a BLAS dot per block, added in float64.

    Float32 dots (relative error ~1e-6 per block) are ample for warnings that compare norms
    within a factor of ten and cosines with 0.5; float64 conversions cost 4x the time.
    """
    return sum(float(torch.dot(first[block], second[block])) for block in blocks(first.numel()))


class TaskVectorChecks:
    """Accumulates, over a merge's jobs, each input model's task-vector and weight sums.

    Pass :meth:`observe` to :func:`alloykit.execute.execute` (``on_inputs``); read
    :meth:`warnings` after the last job. Jobs without a base (or copies) are ignored.
    """

    def __init__(self, models: Sequence[str]) -> None:
        self.models = list(models)
        self._delta_sq = dict.fromkeys(self.models, 0.0)
        self._seen = dict.fromkeys(self.models, False)
        # the shared-base figures come from matrices only (see stats.shares_base)
        self._matrix_delta_sq = dict.fromkeys(self.models, 0.0)
        self._weight_sq = dict.fromkeys(self.models, 0.0)
        self._dot_base = dict.fromkeys(self.models, 0.0)
        self._base_sq = dict.fromkeys(self.models, 0.0)
        self._delta_norm_setting: set[str] = set()

    def observe(self, job: TensorJob, tensors: torch.Tensor, base: torch.Tensor | None) -> None:
        """Add one job's sums; ``tensors`` is ``(k, *shape)`` in job input order."""
        if base is None or job.method == COPY:
            return
        self._delta_norm_setting.add(str(job.params.get("delta_norm", "none")))
        matrix = base.dim() >= 2
        loops = fused_loops(tensors, base)
        if loops is not None:  # one pass over the inputs on CPU
            sums, base_total = loops.base_sums(
                tensors.reshape(tensors.shape[0], -1).numpy(), base.reshape(-1).numpy()
            )
            for (delta_sq, dot, weight_sq), item in zip(sums.tolist(), job.inputs, strict=True):
                self._add(item.model, matrix, delta_sq, dot, weight_sq, base_total)
            return
        base_sq = _square_norm(base) if matrix else 0.0
        flat_base = base.reshape(-1)
        parts = blocks(flat_base.numel())
        # one workspace for every block's difference (a fresh block each time costs page faults)
        size = max((p.stop - p.start for p in parts), default=0)
        work = torch.empty(size, dtype=base.dtype, device=base.device)
        for row, item in zip(tensors, job.inputs, strict=True):
            if item.model not in self._delta_sq:
                continue
            flat = row.reshape(-1)
            # block by block: the sums' temporaries are blocks, not copies of the tensor
            delta_sq = dot = weight_sq = 0.0
            for block in parts:
                part, origin = flat[block], flat_base[block]
                delta = torch.sub(part, origin, out=work[: part.numel()])
                delta_sq += float(torch.dot(delta, delta))
                if matrix:
                    dot += float(torch.dot(part, origin))
                    weight_sq += float(torch.dot(part, part))
            self._add(item.model, matrix, delta_sq, dot, weight_sq, base_sq)

    def _add(
        self,
        model: str,
        matrix: bool,
        delta_sq: float,
        dot: float,
        weight_sq: float,
        base_sq: float,
    ) -> None:
        if model not in self._delta_sq:
            return
        self._seen[model] = True
        self._delta_sq[model] += delta_sq
        if matrix:
            self._matrix_delta_sq[model] += delta_sq
            self._weight_sq[model] += weight_sq
            self._dot_base[model] += dot
            self._base_sq[model] += base_sq

    def add(self, other: TaskVectorChecks) -> None:
        """Add the sums ``other`` gathered over other jobs of the same merge (its parts)."""
        for sums, more in (
            (self._delta_sq, other._delta_sq),
            (self._matrix_delta_sq, other._matrix_delta_sq),
            (self._weight_sq, other._weight_sq),
            (self._dot_base, other._dot_base),
            (self._base_sq, other._base_sq),
        ):
            for model, value in more.items():
                sums[model] = sums.get(model, 0.0) + value
        for model, seen in other._seen.items():
            self._seen[model] = self._seen.get(model, False) or seen
        self._delta_norm_setting |= other._delta_norm_setting

    def warnings(self) -> list[str]:
        """Zero task vectors, models that do not share the base, norms differing by over 10x."""
        seen = [m for m in self.models if self._seen[m]]
        messages = []
        for model in seen:
            if self._delta_sq[model] == 0:
                messages.append(
                    f"model '{model}' is identical to the base in every merged tensor: its task "
                    "vector is zero and it changes nothing; check that it is the fine-tune you meant"
                )
                continue
            if self._base_sq[model] == 0 or self._weight_sq[model] == 0:
                continue
            relative = math.sqrt(self._matrix_delta_sq[model] / self._base_sq[model])
            cosine = self._dot_base[model] / math.sqrt(
                self._weight_sq[model] * self._base_sq[model]
            )
            if not shares_base(relative, cosine):
                messages.append(
                    f"model '{model}' does not look fine-tuned from the base: its task vector is "
                    f"{relative:.2f} of the base's norm (over {NOT_SHARED_RELATIVE:g} is suspect) "
                    f"and its weights have cosine {cosine:.2f} with the base's (under "
                    f"{NOT_SHARED_COSINE:g} is suspect); task-vector merges assume one shared base "
                    "(`alloykit inspect` shows per layer)"
                )
        norms = {m: math.sqrt(self._delta_sq[m]) for m in seen if self._delta_sq[m] > 0}
        if len(norms) > 1 and self._delta_norm_setting <= {"none"}:
            largest = max(norms, key=lambda m: norms[m])
            smallest = min(norms, key=lambda m: norms[m])
            ratio = norms[largest] / norms[smallest]
            if ratio > NORM_RATIO:
                messages.append(
                    f"task-vector norms differ by {ratio:.0f}x ('{largest}' {norms[largest]:.3g}, "
                    f"'{smallest}' {norms[smallest]:.3g}): the larger drowns the smaller; set "
                    "delta_norm: l2 to scale them to a common norm"
                )
        return messages
