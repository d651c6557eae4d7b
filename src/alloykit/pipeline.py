"""The merge verbs: plan a config, run it into a model folder or into a state dict.

This module wires the pipeline together (config -> checkpoints -> plan -> execute -> writer);
each step lives in its own module.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from alloykit.config import MergeConfig, model_refs, recipe_hash
from alloykit.errors import AlloyError
from alloykit.execute import ExecutionOptions, StateDictSink, TaskVectorSource, execute
from alloykit.inspect.merge_checks import TaskVectorChecks, coefficient_warnings
from alloykit.io.checkpoint import Checkpoint, open_checkpoint
from alloykit.io.hub import resolve_model
from alloykit.io.tokenizer_files import write_output_tokenizer
from alloykit.io.writer import (
    OutputFolder,
    ShardWriter,
    TensorSlot,
    check_output_folder,
    copy_donor_files,
    layout_shards,
    parse_size,
    write_config,
)
from alloykit.model_card import InputHashes, InputRecord, input_records
from alloykit.plan import MergePlan, TensorJob, build_plan
from alloykit.stages import MemoryCheckpoint, available_memory, load_stages, stage_names

log = logging.getLogger("alloykit")
RECIPE_FILE = "alloykit_config.yml"
ConfigSource = MergeConfig | str | Path | Mapping[str, Any]


@dataclass(frozen=True)
class MergeOptions:
    """Options of a merge (the CLI flags of ``alloykit merge``).

    Args:
        device: ``cpu``, ``cuda`` or ``auto`` (default cpu).
        seed: seed for methods that sample (per-tensor generators); None draws one.
        threads: torch threads for the arithmetic (default: torch's choice).
        out_shard_size: largest output shard, ``5B`` = 5x10^9 bytes (default), ``500MB``, ``2GiB``.
        copy_tokenizer: copy the donor's tokenizer files (default True).
        overwrite: replace an existing non-empty output folder.
        strict: parameters the method does not use are errors, not warnings.
        allow_crimes: merge models whose model_type or architectures differ.
        trust_remote_code: copy a custom-code model's ``*.py`` files into the output, which
            loading it with ``trust_remote_code=True`` needs.
        precision: working precision, ``float32`` (default) or ``float64``.
        intermediate_dir: where a multi-stage recipe writes its intermediate models; None
            keeps them in memory.
        model_card: write ``README.md`` (front matter, method, inputs, recipe) into the output.
        hash_inputs: list the sha256 of local input files in the model card (read and hashed
            during the merge; Hub inputs' hashes are free and always listed).
        checks: warn about suspicious inputs (coefficients far from one, task vectors of very
            different norms, zero task vectors, models that do not share the base).
    """

    device: str = "cpu"
    seed: int | None = None
    threads: int | None = None
    out_shard_size: str | int = "5B"
    copy_tokenizer: bool = True
    overwrite: bool = False
    strict: bool = False
    allow_crimes: bool = False
    trust_remote_code: bool = False
    precision: str = "float32"
    intermediate_dir: str | Path | None = None
    model_card: bool = True
    hash_inputs: bool = False
    checks: bool = True


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    output: Path
    plan: MergePlan
    files: list[str]
    recipe_hash: str
    seconds: float
    warnings: list[str] = field(default_factory=list)


ProgressHook = Callable[[TensorJob], None]


@dataclass(frozen=True)
class ShardWork:
    """Writing a plan's output shards into ``folder``: what :func:`merge` hands a shard runner.

    ``checkpoints`` are the final stage's opened inputs and ``stages`` the recipe's stages
    (the final one last); ``execution`` has the seed fixed, so that every part of a split
    merge draws the same random numbers; ``checks`` gathers the task-vector sums.
    """

    folder: Path
    shards: list[list[TensorSlot]]
    plan: MergePlan
    checkpoints: Mapping[str, Checkpoint]
    stages: list[MergeConfig]
    execution: ExecutionOptions
    checks: TaskVectorChecks | None
    progress: ProgressHook | None


ShardRunner = Callable[[ShardWork], None]


def write_shards(work: ShardWork) -> None:
    """The default shard runner: every job in this process, each tensor straight to its shard."""
    with ShardWriter(work.folder, work.shards) as writer:
        observe = work.checks.observe if work.checks is not None else None
        execute(work.plan, work.checkpoints, writer, work.execution, work.progress, observe)
        writer.finish()


@contextmanager
def open_models(
    config: MergeConfig,
    provided: Mapping[str, Checkpoint] | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[dict[str, Checkpoint]]:
    """Resolve and index every model the config names (no tensor data is read).

    ``provided`` holds checkpoints already open (earlier stages' results), used by label.
    ``base+adapter`` references open as the base read through the adapter; ``dtype`` is the
    dtype their adapted tensors are returned in (None: as stored, like PEFT's merged model).
    """
    checkpoints: dict[str, Checkpoint] = {}
    opened: list[Checkpoint] = []
    try:
        for ref in model_refs(config):
            label = str(ref)
            if provided is not None and label in provided:
                checkpoints[label] = provided[label]
                continue
            checkpoint = open_checkpoint(resolve_model(ref.path, ref.revision), label)
            opened.append(checkpoint)
            if ref.lora:  # base+adapter: the adapter is applied as each tensor is read
                from alloykit.lora.checkpoint import open_adapted

                checkpoint = open_adapted(checkpoint, ref.lora, ref.lora_revision, label, dtype)
                opened[-1] = checkpoint
            if ref.override_architecture and checkpoint.config is not None:
                checkpoint.config["architectures"] = [ref.override_architecture]
            checkpoints[label] = checkpoint
        yield checkpoints
    finally:
        for checkpoint in opened:
            checkpoint.close()


@dataclass
class _Stages:
    stages: list[MergeConfig]  # in run order, the final output last
    checkpoints: dict[str, Checkpoint]  # the final stage's inputs, earlier results included
    plans: list[MergePlan]  # the intermediate stages' plans


@contextmanager
def _final_inputs(
    config: ConfigSource, options: MergeOptions, *, dry_run: bool = False
) -> Iterator[_Stages]:
    """Run a recipe's intermediate stages (plan only when ``dry_run``); yield the final inputs."""
    stages = load_stages(config, strict=options.strict)
    results: dict[str, Checkpoint] = {}
    plans: list[MergePlan] = []
    try:
        for stage in stages[:-1]:
            assert stage.name is not None  # load_stages guarantees names before the final
            results[stage.name] = _run_stage(stage, results, options, plans, dry_run=dry_run)
        with open_models(stages[-1], results) as checkpoints:
            yield _Stages(stages, checkpoints, plans)
    finally:
        for result in results.values():
            result.close()


@contextmanager
def final_inputs(
    config: ConfigSource, options: MergeOptions | None = None
) -> Iterator[tuple[MergeConfig, dict[str, Checkpoint]]]:
    """The final stage of a recipe and its opened inputs (earlier stages merged in memory or
    into ``options.intermediate_dir``), for callers that run the final plan themselves."""
    with _final_inputs(config, options or MergeOptions()) as run:
        yield run.stages[-1], run.checkpoints


def _run_stage(
    stage: MergeConfig,
    results: Mapping[str, Checkpoint],
    options: MergeOptions,
    plans: list[MergePlan],
    *,
    dry_run: bool,
) -> Checkpoint:
    name = stage.name or "stage"
    with open_models(stage, results) as checkpoints:
        plan = build_plan(stage, checkpoints, allow_crimes=options.allow_crimes)
        plans.append(plan)
        for warning in plan.warnings:
            log.warning(f"stage '{name}': {warning}")
        files = None
        if plan.tokenizer is not None and (dry_run or options.intermediate_dir is None):
            files = _stage_files(name, plan)  # later stages read the stage's tokenizer
        if dry_run:
            return MemoryCheckpoint(name, plan, None, files)
        if options.intermediate_dir is not None:
            target = Path(options.intermediate_dir) / name
            intermediate = replace(options, overwrite=True, model_card=False, checks=False)
            _write(plan, checkpoints, [stage], target, intermediate, None)
            return Checkpoint(target, name)
        available = available_memory()
        if available is not None and plan.output_bytes > available // 2:
            raise AlloyError(
                f"stage '{name}' needs {plan.output_bytes / 1e9:.1f} GB in memory and "
                f"{available / 1e9:.1f} GB is free; pass --intermediate-dir to write it to disk"
            )
        log.info(f"stage '{name}': merging {len(plan.jobs)} tensors in memory")
        sink = StateDictSink()
        execute(plan, checkpoints, sink, _execution(options))
        return MemoryCheckpoint(name, plan, sink, files)


def _stage_files(name: str, plan: MergePlan) -> Path:
    """A temporary folder with an in-memory stage's tokenizer and generation files."""
    import tempfile

    assert plan.tokenizer is not None
    folder = Path(tempfile.mkdtemp(prefix=f"alloykit-stage-{name}-"))
    try:
        copy_donor_files(folder, plan.models[plan.donor], tokenizer=False, code=False)
        write_output_tokenizer(folder, plan.tokenizer, plan.models, plan.donor)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def plan_stages(
    config: ConfigSource, options: MergeOptions | None = None
) -> list[tuple[str, MergePlan]]:
    """Plan every stage of a recipe without reading tensors: ``[(stage name, plan), ...]``."""
    options = options or MergeOptions()
    with _final_inputs(config, options, dry_run=True) as run:
        final = build_plan(run.stages[-1], run.checkpoints, allow_crimes=options.allow_crimes)
    plans = [*run.plans, final]
    for plan in plans:
        for warning in plan.warnings:
            log.warning(warning)
    return [(stage.name or "final", plan) for stage, plan in zip(run.stages, plans, strict=True)]


def plan_merge(config: ConfigSource, options: MergeOptions | None = None) -> MergePlan:
    """Validate ``config`` and plan it without reading any tensor (what ``--dry-run`` shows).

    For a multi-stage recipe this is the final stage's plan (:func:`plan_stages` gives all).
    """
    return plan_stages(config, options)[-1][1]


def merge(
    config: ConfigSource,
    out_dir: str | Path,
    options: MergeOptions | None = None,
    *,
    progress: ProgressHook | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
    shard_runner: ShardRunner | None = None,
) -> MergeResult:
    """Merge the models ``config`` names and write the result to ``out_dir``.

    The output folder appears only when complete: shards, index, ``config.json``, generation
    config, tokenizer files and the recipe (``alloykit_config.yml``, which this function
    accepts back). A multi-stage recipe (several YAML documents) runs its stages first.
    ``progress`` is called after each tensor of the final stage; ``on_plan`` once with its plan.
    ``shard_runner`` computes and writes the final stage's shards (default: here, one tensor
    at a time; :func:`alloykit.distributed.merge.ray_shard_runner` spreads them over Ray).

    Example:
        >>> result = merge("examples/linear.yml", "merged")  # doctest: +SKIP
        >>> result.output
        PosixPath('merged')
    """
    started = time.perf_counter()
    options = options or MergeOptions()
    out = Path(out_dir)
    check_output_folder(out, overwrite=options.overwrite)
    parse_size(options.out_shard_size)  # a bad size fails before any work
    with _final_inputs(config, options) as run:
        plan = build_plan(run.stages[-1], run.checkpoints, allow_crimes=options.allow_crimes)
        warnings = list(plan.warnings)
        if options.checks:
            warnings += coefficient_warnings(plan)
        donor = run.checkpoints[plan.donor]
        if (donor.config or {}).get("auto_map") and not options.trust_remote_code:
            warnings.append(
                f"'{plan.donor}' uses custom model code (auto_map); pass --trust-remote-code to "
                "copy its *.py files so the output loads with trust_remote_code=True"
            )
        for warning in warnings:
            log.warning(warning)
        if on_plan is not None:
            on_plan(plan)
        written = _write(
            plan, run.checkpoints, run.stages, out, options, progress, warnings, shard_runner
        )
    seconds = time.perf_counter() - started
    return MergeResult(out, plan, written.files, written.digest, seconds, written.warnings)


@dataclass(frozen=True)
class _Written:
    files: list[str]
    digest: str
    warnings: list[str]  # the plan's and the checks' warnings


def _write(
    plan: MergePlan,
    checkpoints: Mapping[str, Checkpoint],
    stages: list[MergeConfig],
    out: Path,
    options: MergeOptions,
    progress: ProgressHook | None,
    warnings: list[str] | None = None,
    shard_runner: ShardRunner | None = None,
) -> _Written:
    """Execute ``plan`` into a new model folder at ``out``; return its files and recipe hash.

    ``warnings`` (the plan's) go into the model card with those of the checks run on the way.
    """
    shards = layout_shards(
        [(j.output, j.shape, j.dtype) for j in plan.jobs], parse_size(options.out_shard_size)
    )
    donor = checkpoints[plan.donor]
    warnings = list(warnings or [])
    checks = TaskVectorChecks(list(plan.models)) if options.checks else None
    with (
        OutputFolder(out, overwrite=options.overwrite) as folder,
        InputHashes(checkpoints if options.model_card and options.hash_inputs else {}) as hashes,
    ):
        execution = _execution(options)
        if execution.seed is None:  # one seed for all the parts, should the work be split
            execution = replace(execution, seed=secrets.randbits(63))
        work = ShardWork(
            folder.path, shards, plan, checkpoints, stages, execution, checks, progress
        )
        (shard_runner or write_shards)(work)
        if checks is not None:
            for warning in checks.warnings():
                log.warning(warning)
                warnings.append(warning)
        if plan.config is not None:
            write_config(folder.path, plan.config, plan.output_dtype)
        copy_donor_files(
            folder.path,
            donor.folder,
            tokenizer=options.copy_tokenizer and plan.tokenizer is None,
            code=bool((donor.config or {}).get("auto_map")) and options.trust_remote_code,
        )
        if plan.tokenizer is not None:  # the config builds one: written even without copying
            write_output_tokenizer(folder.path, plan.tokenizer, plan.models, plan.donor)
        recipes = _portable_stages(stages)
        digest = recipes_hash(recipes)
        header = f"# alloykit recipe {digest[:16]}: alloykit merge {RECIPE_FILE} OUT\n"
        body = "---\n".join(recipe.to_yaml() for recipe in recipes)
        (folder.path / RECIPE_FILE).write_text(header + body)
        if options.model_card:
            inputs = input_records(
                stages[-1], checkpoints, hashes.result(), hash_local=options.hash_inputs
            )
            _write_card(folder.path, out.name, plan, inputs, body, digest, warnings)
        files = sorted(p.name for p in folder.path.iterdir())
        folder.commit()
    return _Written(files, digest, warnings)


def _write_card(
    folder: Path,
    name: str,
    plan: MergePlan,
    inputs: list[InputRecord],
    recipe: str,
    digest: str,
    warnings: list[str],
) -> None:
    """The output's README.md (front matter, method, inputs, recipe, warnings)."""
    from alloykit import __version__
    from alloykit.model_card import CARD_FILE, render_card

    text = render_card(
        name=name,
        inputs=inputs,
        method=plan.method,
        summary=plan.kernel.summary,
        citation=plan.kernel.citation,
        recipe=recipe,
        recipe_hash=digest,
        warnings=warnings,
        version=__version__,
    )
    (folder / CARD_FILE).write_text(text)


def _portable_stages(stages: list[MergeConfig]) -> list[MergeConfig]:
    return [portable_recipe(stage, stage_names(stages)) for stage in stages]


def recipes_hash(stages: list[MergeConfig]) -> str:
    """:func:`recipe_hash` of a one-stage recipe; a hash of the stages' hashes otherwise."""
    if len(stages) == 1:
        return recipe_hash(stages[0])
    import hashlib

    return hashlib.sha256("".join(recipe_hash(s) for s in stages).encode()).hexdigest()


@dataclass(frozen=True)
class MergedState:
    """A merge held in memory: its tensors, its plan and the hash of its recipe.

    ``config`` is the ``config.json`` a merge would write (with the output dtype) and
    ``donor_folder`` the folder whose tokenizer it would copy.
    """

    state: dict[str, torch.Tensor]
    plan: MergePlan
    recipe_hash: str

    @property
    def config(self) -> dict[str, Any] | None:
        if self.plan.config is None:
            return None
        return dict(self.plan.config, dtype=self.plan.output_dtype)

    @property
    def donor_folder(self) -> Path:
        return self.plan.models[self.plan.donor]


class TaskVectorProvider(Protocol):
    """Gives a plan its task vectors ready-made (a recipe search's cache,
    :class:`alloykit.search.cache.TaskVectorCache`), or None to merge as usual."""

    def source(
        self,
        plan: MergePlan,
        checkpoints: Mapping[str, Checkpoint],
        options: ExecutionOptions,
    ) -> TaskVectorSource | None: ...


def merge_in_memory(
    config: ConfigSource,
    options: MergeOptions | None = None,
    *,
    progress: ProgressHook | None = None,
    task_vectors: TaskVectorProvider | None = None,
) -> MergedState:
    """Run the same plan as :func:`merge` into memory, with what is needed to load the result.

    The recipe hash equals the one :func:`merge` reports for the same recipe; the plan's
    warnings are in ``plan.warnings`` (not logged). ``task_vectors`` supplies task vectors
    computed ahead for a one-stage recipe of a task-vector method; the result is the same.
    """
    options = options or MergeOptions()
    with _final_inputs(config, options) as run:
        plan = build_plan(run.stages[-1], run.checkpoints, allow_crimes=options.allow_crimes)
        sink = StateDictSink()
        execution = _execution(options)
        source = None
        if task_vectors is not None and len(run.stages) == 1:  # earlier stages change per run
            source = task_vectors.source(plan, run.checkpoints, execution)
        execute(plan, run.checkpoints, sink, execution, progress, task_vectors=source)
        digest = recipes_hash(_portable_stages(run.stages))
    return MergedState(dict(sink), plan, digest)


def merge_to_state_dict(
    config: ConfigSource,
    options: MergeOptions | None = None,
    *,
    progress: ProgressHook | None = None,
) -> dict[str, torch.Tensor]:
    """Run the same plan as :func:`merge` into memory; returns ``{tensor name: tensor}``.

    Example:
        >>> state = merge_to_state_dict("examples/linear.yml")  # doctest: +SKIP
        >>> model.load_state_dict(state)
    """
    return merge_in_memory(config, options, progress=progress).state


def _execution(options: MergeOptions) -> ExecutionOptions:
    return ExecutionOptions(options.device, options.precision, options.seed, options.threads)


def portable_recipe(config: MergeConfig, stage_names: set[str] | None = None) -> MergeConfig:
    """The recipe with local model folders and files made absolute, so it runs again anywhere.

    References to earlier stages (``stage_names``) are left as they are.
    """
    from alloykit.config import ModelRef

    def absolute(ref: ModelRef) -> ModelRef:
        update = {}
        local = Path(ref.path).expanduser()
        if ref.path not in (stage_names or set()) and local.exists():
            update["path"] = str(local.resolve())
        if ref.lora and Path(ref.lora).expanduser().exists():
            update["lora"] = str(Path(ref.lora).expanduser().resolve())
        return ref.model_copy(update=update) if update else ref

    data = config.model_copy(deep=True)
    if data.calibration is not None and Path(data.calibration.data).expanduser().exists():
        data.calibration.data = str(Path(data.calibration.data).expanduser().resolve())
    if data.base_model is not None:
        data.base_model = absolute(data.base_model)
    if data.heads is not None:
        data.heads.source = absolute(data.heads.source)
    groups = [(data.models, data.slices)]
    groups += [(module.models, module.slices) for module in (data.modules or {}).values()]
    for models, slices in groups:
        for entry in models or []:
            entry.model = absolute(entry.model)
        for output_slice in slices or []:
            if output_slice.base_model is not None:
                output_slice.base_model = absolute(output_slice.base_model)
            for source in output_slice.sources:
                source.model = absolute(source.model)
    return data
