"""Multi-stage recipes: several YAML documents, each a merge, later ones using earlier results.

Each document but the final one has a ``name``; a model reference equal to a name means that
stage's result (MergeKit's multi-merge). Stages run in dependency order, whatever their order in
the file; the final output is the unnamed document (or the last one when all are named).
Intermediate results stay in memory as state dicts, or are written to ``intermediate_dir`` as
model folders when one is given (needed when they do not fit in memory).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from alloykit.config import MergeConfig, check_config, parse_config, read_documents
from alloykit.errors import AlloyError, CheckpointError, ConfigError
from alloykit.io.checkpoint import DTYPE_CODES, Checkpoint, TensorInfo
from alloykit.plan import MergePlan, model_labels

log = logging.getLogger("alloykit")


class MemoryCheckpoint(Checkpoint):
    """A checkpoint whose tensors are in memory (an intermediate result), or only planned.

    ``tensors`` describes them like a folder's index; :meth:`read` returns them. Without a
    state dict (a dry run) the tensors are known by name, shape and dtype only. ``files`` is a
    temporary folder holding the stage's own tokenizer and generation files, when it builds a
    tokenizer; it is removed on :meth:`close`.
    """

    def __init__(
        self,
        label: str,
        plan: MergePlan,
        state: Mapping[str, torch.Tensor] | None,
        files: Path | None = None,
    ) -> None:
        self.label = label
        # tokenizer and generation files come from here
        self.folder = files if files is not None else plan.models[plan.donor]
        self._files = files
        self.config = dict(plan.config, dtype=plan.output_dtype) if plan.config else None
        where = Path(f"<result of stage '{label}'>")
        self.tensors = {
            job.output: TensorInfo(job.output, job.shape, job.dtype, where) for job in plan.jobs
        }
        self._state = dict(state) if state is not None else None

    def read(self, name: str) -> torch.Tensor:
        if self._state is None:
            raise AlloyError(f"stage '{self.label}' was only planned (dry run); it has no values")
        if name not in self._state:
            raise CheckpointError(f"stage '{self.label}' has no tensor '{name}'")
        tensor = self._state[name]
        assert DTYPE_CODES[tensor.dtype] == self.tensors[name].dtype
        return tensor

    def close(self) -> None:
        self._state = None
        if self._files is not None:
            shutil.rmtree(self._files, ignore_errors=True)
            self._files = None


def load_stages(source: Any, *, strict: bool = False) -> list[MergeConfig]:
    """The stages of a recipe in the order they must run; the final output last.

    ``source`` is a MergeConfig, a dict, a YAML file or YAML text, with one or several
    documents. Raises one ConfigError listing every problem (with ``documents[i].`` paths).
    """
    if isinstance(source, MergeConfig):
        configs = [source]
    elif isinstance(source, Mapping):
        configs = [parse_config(source)]
    else:
        configs = []
        problems: list[str] = []
        for index, document in enumerate(read_documents(source)):
            try:
                configs.append(parse_config(document))
            except ConfigError as e:
                problems += [f"documents[{index}].{p}" for p in e.problems]
        if problems:
            raise ConfigError(problems)
    if len(configs) == 1:
        for warning in check_config(configs[0], strict=strict):
            log.warning(warning)
        return configs
    return _order(configs, strict=strict)


def _order(configs: list[MergeConfig], *, strict: bool) -> list[MergeConfig]:
    problems = []
    unnamed = [i for i, c in enumerate(configs) if not c.name]
    if len(unnamed) > 1:
        problems.append(f"documents {unnamed}: only the final document may have no name")
    names: dict[str, int] = {}
    for index, config in enumerate(configs):
        if config.name in names:
            problems.append(
                f"documents[{index}].name: '{config.name}' is also documents[{names[config.name]}]"
            )
        if config.name:
            names[config.name] = index
        try:
            for warning in check_config(config, strict=strict):
                log.warning(f"documents[{index}].{warning}")
        except ConfigError as e:
            problems += [f"documents[{index}].{p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    final = unnamed[0] if unnamed else len(configs) - 1
    needs = {i: {names[m] for m in model_labels(c) if m in names} for i, c in enumerate(configs)}
    order: list[int] = []
    visiting: set[int] = set()

    def visit(index: int) -> None:
        if index in order:
            return
        if index in visiting:
            raise ConfigError(
                f"documents[{index}]: stage '{configs[index].name}' depends on itself through {sorted(visiting)}"
            )
        visiting.add(index)
        for dependency in sorted(needs[index]):
            visit(dependency)
        visiting.discard(index)
        order.append(index)

    visit(final)
    unused = [configs[i].name for i in range(len(configs)) if i not in order]
    if unused:
        raise ConfigError(
            f"stages {unused} are not used by the final document; remove them or use them"
        )
    return [configs[i] for i in order]


def stage_names(stages: list[MergeConfig]) -> set[str]:
    """Names of the intermediate stages (the model references they satisfy)."""
    return {s.name for s in stages[:-1] if s.name}


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
