"""Streaming the statistics: one tensor (of every model) at a time, grouped by layer and kind.

Two entry points: :func:`inspect_models` (a base and fine-tunes, no recipe) reads each tensor
of every model once; :func:`inspect_config` runs a recipe's merge through the executor, without
writing it, and adds per tensor what the method kept of each task vector and how far the
merged task vector is from plain task arithmetic. Memory holds one tensor of every model (and
their float64 task vectors), never a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from alloykit.architecture import layer_stack_prefix, module_kind, split_layer_name
from alloykit.errors import AlloyError, IncompatibleModels
from alloykit.execute import (
    ExecutionOptions,
    execute,
    job_generator,
    method_inputs,
    resolve_device,
)
from alloykit.inspect.stats import Sums, retained_sums, task_vector_sums, tensor_sums
from alloykit.io.checkpoint import FLOAT_CODES, Checkpoint, open_checkpoint
from alloykit.io.hub import resolve_model
from alloykit.methods import Method
from alloykit.methods.task_vectors import ZERO_WEIGHT_SUM, elect, sparsify_deltas
from alloykit.plan import COPY, MergePlan, TensorJob, build_plan

GroupKey = tuple[int | None, str]  # (layer index or None outside the layer stack, module kind)


@dataclass
class Inspection:
    """The sums of every inspected tensor, by (layer, module kind); figures come from them.

    ``models`` are the fine-tuned models' labels (the base excluded), the order every array of
    :class:`~alloykit.inspect.stats.Sums` follows. ``matrices`` sums the tensors of two or more
    dimensions only (the shared-base check's figures).
    """

    base: str
    models: list[str]
    groups: dict[GroupKey, Sums]
    matrices: Sums
    method: str | None = None  # the recipe's method, with a recipe
    skipped: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        """The layer indices seen, ascending."""
        return sorted({layer for layer, _ in self.groups if layer is not None})

    @property
    def kinds(self) -> list[str]:
        """The module kinds seen, in a fixed order."""
        order = ("attention", "mlp", "norm", "embedding", "head", "other")
        present = {kind for _, kind in self.groups}
        return [k for k in order if k in present] + sorted(present - set(order))

    def total(self) -> Sums:
        """Every tensor's sums together."""
        return self.select(lambda key: True)

    def layer(self, index: int, kind: str | None = None) -> Sums:
        """One layer's sums (one module kind's when ``kind`` is given)."""
        if kind is not None:
            empty = Sums(len(self.models))
            empty.add(self.groups.get((index, kind), Sums(len(self.models))))
            return empty
        return self.layer_range(index, index, kind)

    def layer_range(self, first: int, last: int, kind: str | None = None) -> Sums:
        """The sums of layers ``first..last`` (of one module kind when ``kind`` is given)."""
        return self.select(
            lambda key: (
                key[0] is not None and first <= key[0] <= last and (kind is None or key[1] == kind)
            )
        )

    def select(self, keep: Callable[[GroupKey], bool]) -> Sums:
        """The sums of the groups whose key ``keep(key)`` accepts."""
        sums = Sums(len(self.models))
        for key, group in self.groups.items():
            if keep(key):
                sums.add(group)
        return sums

    def add(
        self,
        name: str,
        shape: tuple[int, ...],
        sums: Sums,
        models: list[int],
        stack_prefix: str | None,
    ) -> None:
        """Add one tensor's sums (its model ``j`` is ``self.models[models[j]]``)."""
        parts = split_layer_name(name)
        layer = parts.index if parts is not None and parts.prefix == stack_prefix else None
        key = (layer, module_kind(name) or "other")
        self.groups.setdefault(key, Sums(len(self.models))).add(sums, models)
        if len(shape) >= 2:
            self.matrices.add(sums, models)


def _open(path: str) -> Checkpoint:
    return open_checkpoint(resolve_model(path), path)


def inspect_models(base: str, models: Sequence[str]) -> Inspection:
    """Statistics of ``models``' task vectors against ``base`` (folders or repo ids).

    Tensors are compared by name; float tensors that some model lacks or shapes differently
    (a resized vocabulary) are left out and listed in ``skipped``. Raises IncompatibleModels
    when no tensor is common to all.

    Example:
        >>> report = inspect_models("models/base", ["models/ft1", "models/ft2"])  # doctest: +SKIP
        >>> report.total().cosine()[0, 1]
    """
    if not models:
        raise AlloyError("inspect: give at least one model besides --base")
    labels = list(dict.fromkeys(models))
    opened: list[Checkpoint] = []
    try:
        base_checkpoint = _open(base)
        opened.append(base_checkpoint)
        checkpoints = []
        for label in labels:
            checkpoints.append(_open(label))
            opened.append(checkpoints[-1])
        inspection = Inspection(base, labels, {}, Sums(len(labels)))
        prefix = layer_stack_prefix(base_checkpoint.tensors)
        for name, info in base_checkpoint.tensors.items():
            if info.dtype not in FLOAT_CODES or info.numel == 0:
                continue
            others = [c.tensors.get(name) for c in checkpoints]
            missing = [c.label for c, o in zip(checkpoints, others, strict=True) if o is None]
            if missing:
                inspection.skipped.append(f"{name}: not in {', '.join(missing)}")
                continue
            shapes = {o.shape for o in others if o is not None}
            if shapes != {info.shape}:
                inspection.skipped.append(
                    f"{name}: shapes differ ({sorted(shapes | {info.shape})})"
                )
                continue
            base_tensor = base_checkpoint.read(name)
            values = [c.read(name) for c in checkpoints]
            dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
            stack = torch.stack([v.to(dtype) for v in values])  # (k, *shape), as stored
            del values
            sums = tensor_sums(base_tensor, stack)
            inspection.add(name, info.shape, sums, list(range(len(labels))), prefix)
            del stack, base_tensor
        if not inspection.groups:
            raise IncompatibleModels(
                f"inspect: no float tensor of '{base}' is in every model with the same shape; "
                "are these models of one architecture?"
            )
        return inspection
    finally:
        for checkpoint in opened:
            checkpoint.close()


class _RecipeObserver:
    """Collects a recipe's statistics from the executor: inputs first, then the merged tensor."""

    def __init__(
        self, plan: MergePlan, base: str, models: list[str], seed: int, device: torch.device
    ) -> None:
        self.plan = plan
        self.seed = seed
        self.device = device
        self.inspection = Inspection(base, models, {}, Sums(len(models)), method=plan.method)
        self.prefix = layer_stack_prefix(job.output for job in plan.jobs)
        # by output name: job i + 1's inputs may come before job i's result is written
        self._pending: dict[str, tuple[TensorJob, Sums, list[int], torch.Tensor, torch.Tensor]] = {}

    def observe(self, job: TensorJob, tensors: torch.Tensor, base: torch.Tensor | None) -> None:
        assert base is not None  # only jobs with a base are run
        # a copy: the executor reuses the inputs' memory while this job's result is written
        base64 = base.reshape(-1).to(torch.float64, copy=True)
        deltas = tensors.reshape(tensors.shape[0], -1).to(torch.float64) - base64  # (k, n)
        sums = task_vector_sums(base64, deltas)
        survived = survived_mask(self.plan.kernel, job, tensors, base, self.seed, self.device)
        reference = reference_delta(job, deltas)
        sums.retained_sq = retained_sums(deltas, survived)
        sums.recipe = True
        models = [self.inspection.models.index(item.model) for item in job.inputs]
        self._pending[job.output] = (job, sums, models, base64, reference)

    def write(self, name: str, merged: torch.Tensor) -> None:
        job, sums, models, base64, reference = self._pending.pop(name)
        difference = merged.reshape(-1).to(torch.float64) - base64 - reference
        sums.interference_sq = float(difference.reshape(-1) @ difference.reshape(-1))
        sums.reference_sq = float(reference.reshape(-1) @ reference.reshape(-1))
        self.inspection.add(name, job.shape, sums, models, self.prefix)


def reference_delta(job: TensorJob, deltas: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i δ_i``, plain task arithmetic with the job's coefficients: ``c_i = w_i·λ``,
    divided by ``Σ w`` when the recipe normalizes (float64)."""
    k = deltas.shape[0]
    weights = [float(w) for w in job.per_model.get("weight", (1.0,) * k)]
    scale = float(job.params.get("lambda", 1.0))
    total = sum(weights)
    if job.params.get("normalize") and abs(total) >= ZERO_WEIGHT_SUM:
        scale /= total
    reference = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas, strict=True):
        reference.add_(delta, alpha=weight * scale)
    return reference


def survived_mask(
    kernel: Method,
    job: TensorJob,
    tensors: torch.Tensor,
    base: torch.Tensor,
    seed: int,
    device: torch.device,
) -> torch.Tensor | None:
    """``(k, *shape)`` bool: the entries of each task vector that survive sparsify and elect,
    exactly as the merge computes them (same precision, same random draws); None for methods
    that are not sparsify/elect/combine presets."""
    from alloykit.methods import model_thresholds, preset_steps, task_vector_preset

    preset = task_vector_preset(kernel)
    if preset is None:
        return None
    inputs = method_inputs(job, tensors - base, base, job_generator(seed, job, device))
    steps = preset_steps(preset, job.params)
    per_model = inputs.per_model
    work = sparsify_deltas(
        inputs.tensors,
        steps,
        per_model.get("density"),
        per_model.get("gamma"),
        inputs.generator,
        per_model.get("epsilon"),
        model_thresholds(per_model),
    )
    kept = work != 0
    if steps.elect == "none":
        return kept
    weights = per_model["weight"]
    for i in range(work.shape[0]):
        work[i] *= float(weights[i])
    return kept & elect(work, steps.elect)


def inspect_plan(
    plan: MergePlan,
    checkpoints: Mapping[str, Checkpoint],
    base: str,
    *,
    seed: int = 0,
    precision: str = "float32",
    device: str = "cpu",
) -> Inspection:
    """Run ``plan`` into the statistics instead of a model folder (see :func:`inspect_config`)."""
    jobs = [replace(j, dtype="F64") for j in plan.jobs if j.method != COPY and j.base is not None]
    if not jobs:
        raise AlloyError(
            f"inspect: the recipe's method {plan.method} merges no tensor against a base_model; "
            "task-vector statistics need one"
        )
    models = [label for label in plan.models if label != base]
    observer = _RecipeObserver(replace(plan, jobs=jobs), base, models, seed, resolve_device(device))
    options = ExecutionOptions(device=device, precision=precision, seed=seed)
    execute(observer.plan, checkpoints, observer, options, on_inputs=observer.observe)
    return observer.inspection


def inspect_config(
    config: str | Path | Mapping[str, object],
    *,
    seed: int = 0,
    precision: str = "float32",
    device: str = "cpu",
    allow_crimes: bool = False,
) -> Inspection:
    """Statistics of a recipe's models against its ``base_model``, plus what the method does:
    per tensor the share of each task vector surviving sparsify and elect, and the interference
    ``‖merged delta − Σ c_i δ_i‖ / ‖Σ c_i δ_i‖``. Nothing is written. Earlier stages of a
    multi-stage recipe are merged in memory first; ``seed`` fixes random methods' draws.
    """
    from alloykit.pipeline import MergeOptions, final_inputs

    options = MergeOptions(seed=seed, precision=precision, device=device, allow_crimes=allow_crimes)
    with final_inputs(config, options) as (stage, checkpoints):
        if stage.base_model is None:
            raise AlloyError(
                "inspect: the recipe has no base_model; task vectors are differences from a "
                "base, so add base_model (or use inspect --base BASE MODEL ...)"
            )
        plan = build_plan(stage, checkpoints, allow_crimes=allow_crimes)
        return inspect_plan(
            plan, checkpoints, str(stage.base_model), seed=seed, precision=precision, device=device
        )
