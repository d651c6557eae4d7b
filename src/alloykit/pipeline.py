"""The merge verbs: plan a config, run it into a model folder or into a state dict.

This module wires the pipeline together (config -> checkpoints -> plan -> execute -> writer);
each step lives in its own module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.config import MergeConfig, load_config, recipe_hash
from alloykit.execute import ExecutionOptions, StateDictSink, execute
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.hub import resolve_model
from alloykit.io.writer import (
    OutputFolder,
    ShardWriter,
    check_output_folder,
    copy_donor_files,
    layout_shards,
    parse_size,
    write_config,
)
from alloykit.plan import MergePlan, TensorJob, build_plan, model_labels

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


@contextmanager
def open_models(config: MergeConfig) -> Iterator[dict[str, Checkpoint]]:
    """Resolve and index every model the config names (no tensor data is read)."""
    checkpoints: dict[str, Checkpoint] = {}
    refs = {str(r): r for r in _refs(config)}
    try:
        for label in model_labels(config):
            ref = refs[label]
            checkpoint = Checkpoint(resolve_model(ref.path, ref.revision), label)
            if ref.override_architecture and checkpoint.config is not None:
                checkpoint.config["architectures"] = [ref.override_architecture]
            checkpoints[label] = checkpoint
        yield checkpoints
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()


def _refs(config: MergeConfig) -> list[Any]:
    refs = [m.model for m in config.models or []]
    for output_slice in config.slices or []:
        refs += [s.model for s in output_slice.sources]
        refs += [output_slice.base_model] if output_slice.base_model else []
    return refs + ([config.base_model] if config.base_model else [])


def plan_merge(config: ConfigSource, options: MergeOptions | None = None) -> MergePlan:
    """Validate ``config`` and plan it without reading any tensor (what ``--dry-run`` shows)."""
    options = options or MergeOptions()
    merge_config = load_config(config, strict=options.strict)
    with open_models(merge_config) as checkpoints:
        plan = build_plan(merge_config, checkpoints, allow_crimes=options.allow_crimes)
    for warning in plan.warnings:
        log.warning(warning)
    return plan


def merge(
    config: ConfigSource,
    out_dir: str | Path,
    options: MergeOptions | None = None,
    *,
    progress: ProgressHook | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
) -> MergeResult:
    """Merge the models ``config`` names and write the result to ``out_dir``.

    The output folder appears only when complete: shards, index, ``config.json``, generation
    config, tokenizer files and the recipe (``alloykit_config.yml``, which this function
    accepts back). ``progress`` is called after each tensor; ``on_plan`` once with the plan.

    Example:
        >>> result = merge("examples/linear.yml", "merged")  # doctest: +SKIP
        >>> result.output
        PosixPath('merged')
    """
    started = time.perf_counter()
    options = options or MergeOptions()
    out = Path(out_dir)
    check_output_folder(out, overwrite=options.overwrite)
    shard_bytes = parse_size(options.out_shard_size)
    merge_config = load_config(config, strict=options.strict)
    with open_models(merge_config) as checkpoints:
        plan = build_plan(merge_config, checkpoints, allow_crimes=options.allow_crimes)
        warnings = list(plan.warnings)
        donor = checkpoints[plan.donor]
        custom_code = bool((donor.config or {}).get("auto_map"))
        if custom_code and not options.trust_remote_code:
            warnings.append(
                f"'{plan.donor}' uses custom model code (auto_map); pass --trust-remote-code to "
                "copy its *.py files so the output loads with trust_remote_code=True"
            )
        for warning in warnings:
            log.warning(warning)
        if on_plan is not None:
            on_plan(plan)
        shards = layout_shards([(j.output, j.shape, j.dtype) for j in plan.jobs], shard_bytes)
        with OutputFolder(out, overwrite=options.overwrite) as folder:
            with ShardWriter(folder.path, shards) as writer:
                execute(plan, checkpoints, writer, _execution(options), progress)
                writer.finish()
            if plan.config is not None:
                write_config(folder.path, plan.config, plan.output_dtype)
            copy_donor_files(
                folder.path,
                donor.folder,
                tokenizer=options.copy_tokenizer,
                code=custom_code and options.trust_remote_code,
            )
            recipe = portable_recipe(merge_config)
            header = (
                f"# alloykit recipe {recipe_hash(recipe)[:16]}: alloykit merge {RECIPE_FILE} OUT\n"
            )
            (folder.path / RECIPE_FILE).write_text(header + recipe.to_yaml())
            files = sorted(p.name for p in folder.path.iterdir())
            folder.commit()
    return MergeResult(
        out, plan, files, recipe_hash(recipe), time.perf_counter() - started, warnings
    )


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
    options = options or MergeOptions()
    merge_config = load_config(config, strict=options.strict)
    with open_models(merge_config) as checkpoints:
        plan = build_plan(merge_config, checkpoints, allow_crimes=options.allow_crimes)
        sink = StateDictSink()
        execute(plan, checkpoints, sink, _execution(options), progress)
    return dict(sink)


def _execution(options: MergeOptions) -> ExecutionOptions:
    return ExecutionOptions(options.device, options.precision, options.seed, options.threads)


def portable_recipe(config: MergeConfig) -> MergeConfig:
    """The recipe with local model folders made absolute, so it runs again from anywhere."""
    from alloykit.config import ModelRef

    def absolute(ref: ModelRef) -> ModelRef:
        local = Path(ref.path).expanduser()
        if local.is_dir():
            return ref.model_copy(update={"path": str(local.resolve())})
        return ref

    data = config.model_copy(deep=True)
    if data.base_model is not None:
        data.base_model = absolute(data.base_model)
    for entry in data.models or []:
        entry.model = absolute(entry.model)
    for output_slice in data.slices or []:
        if output_slice.base_model is not None:
            output_slice.base_model = absolute(output_slice.base_model)
        for source in output_slice.sources:
            source.model = absolute(source.model)
    return data
