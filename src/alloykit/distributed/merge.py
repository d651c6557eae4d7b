"""``alloykit merge --ray``: a plan's output shards computed by Ray tasks, one task per shard.

The driver plans the merge as usual and lays out the shards (the layout is fixed before any
tensor is computed, see :mod:`alloykit.io.writer`). Each Ray task reopens the inputs (an
index of the files, no tensor data), runs the jobs of its shard with the driver's seed and
writes the shard into a private folder inside the staging folder; only when the shard is
complete and synced is it renamed next to the others. So a shard file in the staging folder
is always whole, and a retried task simply writes it again.

The driver waits for every task, checks each shard's size, then writes the index, config,
tokenizer, recipe and model card and renames the staging folder into place, as a one-process
merge does. A task whose worker dies (killed, out of memory, node lost) is retried by Ray up
to ``retries`` times; an error of the merge itself (a bad tensor) is not retried. Any failure
cancels the other tasks and removes the staging folder: no output folder appears.

The staging folder sits beside the output, so on a multi-node cluster the output must be on a
filesystem every node mounts at the same path, and so must the input models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alloykit.distributed import LOCAL, DistributedError, ray_cluster, ray_device, resources
from alloykit.errors import AlloyError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.writer import TensorSlot, shard_bytes, write_index
from alloykit.pipeline import ShardRunner, ShardWork

log = logging.getLogger("alloykit")
RETRIES = 2  # attempts after the first when a task's worker dies
FAULT_ENV = "ALLOYKIT_RAY_FAULT"


@dataclass(frozen=True)
class Fault:
    """Fault injection for tests: the worker of part ``part`` exits abruptly mid-shard.

    ``marker`` set: only the first attempt dies (it creates the marker; a retry finds it).
    ``marker`` None: every attempt dies. Read from ``ALLOYKIT_RAY_FAULT`` as ``PART`` or
    ``PART:MARKER`` when not given to :func:`ray_shard_runner`.
    """

    part: int
    marker: str | None = None

    @staticmethod
    def from_environment() -> Fault | None:
        text = os.environ.get(FAULT_ENV)
        if not text:
            return None
        part, _, marker = text.partition(":")
        return Fault(int(part), marker or None)

    def strike(self, part: int) -> None:
        """Kill this worker process when this is the faulty part (and attempt)."""
        if part != self.part:
            return
        if self.marker is not None:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # a retry: the first attempt already died
        os._exit(17)


@dataclass(frozen=True)
class _Part:
    """What one Ray task gets: its shards and how to reopen the inputs."""

    index: int
    shards: list[list[TensorSlot]]
    staging: str
    stage_folders: dict[str, str]  # earlier stages' results on disk, by stage name
    fault: Fault | None


def ray_shard_runner(
    address: str | None = LOCAL,
    workers: int | None = None,
    *,
    retries: int = RETRIES,
    fault: Fault | None = None,
) -> ShardRunner:
    """A shard runner for :func:`alloykit.pipeline.merge` that runs each shard as a Ray task.

    Example:
        >>> from alloykit.pipeline import merge
        >>> merge("recipe.yml", "out", shard_runner=ray_shard_runner("auto"))  # doctest: +SKIP
    """
    fault = fault if fault is not None else Fault.from_environment()

    def run(work: ShardWork) -> None:
        _check_distributable(work)
        with ray_cluster(address, workers) as ray:
            _run_parts(ray, work, retries, fault)

    return run


def _check_distributable(work: ShardWork) -> None:
    from alloykit.prepass import needs_model_scope
    from alloykit.stages import MemoryCheckpoint

    if needs_model_scope(work.plan.kernel, work.plan.jobs):
        raise DistributedError(
            "--ray: density_scope: model ranks every tensor of a model together and cannot be "
            "split by shard; merge without --ray or use density_scope: tensor"
        )
    for label, checkpoint in work.checkpoints.items():
        if isinstance(checkpoint, MemoryCheckpoint):
            raise DistributedError(
                f"--ray: the recipe's stage '{label}' is held in memory, which Ray workers "
                "cannot read; pass --intermediate-dir on a filesystem every node mounts"
            )


def _stage_names(work: ShardWork) -> set[str]:
    return {stage.name for stage in work.stages[:-1] if stage.name is not None}


def _run_parts(ray: Any, work: ShardWork, retries: int, fault: Fault | None) -> None:
    names = _stage_names(work)
    stage_folders = {
        label: str(Path(cp.folder).resolve())
        for label, cp in work.checkpoints.items()
        if label in names
    }
    # the plan, without its warnings, goes to the object store once for all the tasks
    plan_ref = ray.put(dataclasses.replace(work.plan, warnings=[]))
    final_ref = ray.put(work.stages[-1])
    if resources(work.execution.device).get("num_gpus") and not ray.cluster_resources().get("GPU"):
        raise DistributedError(  # the tasks would wait for a GPU forever
            f"--ray: --device {work.execution.device} needs a GPU and the Ray cluster has none"
        )
    execution = dataclasses.replace(work.execution, device=ray_device(work.execution.device))
    task = ray.remote(_merge_part).options(
        max_retries=retries, retry_exceptions=False, **resources(work.execution.device)
    )
    staging = str(work.folder.resolve())
    parts = [
        _Part(i, [shard], staging, stage_folders, fault)
        for i, shard in enumerate(work.shards)
        if shard
    ]
    pending = {
        task.remote(plan_ref, final_ref, part, execution, work.checks is not None): part
        for part in parts
    }
    jobs = {job.output: job for job in work.plan.jobs}
    started = time.perf_counter()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(done[0])
            checks = _result(ray, done[0], part, retries)
            if work.checks is not None and checks is not None:
                work.checks.add(checks)
            if work.progress is not None:
                for slot in (s for shard in part.shards for s in shard):
                    work.progress(jobs[slot.name])
    except BaseException:
        _cancel(ray, list(pending))
        raise
    for leftover in work.folder.glob(".part-*"):  # what a killed attempt was writing
        shutil.rmtree(leftover, ignore_errors=True)
    _check_shards(work.folder, work.shards)
    write_index(work.folder, work.shards)
    log.info(
        f"--ray: {len(parts)} shards written by Ray tasks in {time.perf_counter() - started:.1f}s"
    )


def _result(ray: Any, ref: Any, part: _Part, retries: int) -> Any:
    """The part's return value; its failure as a one-line error."""
    from ray.exceptions import RayTaskError

    files = ", ".join(shard[0].file for shard in part.shards)
    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, AlloyError):
            raise cause from None
        raise DistributedError(
            f"--ray: the task writing {files} failed: {_first_line(cause or e)}"
        ) from e
    except Exception as e:  # the worker died on every attempt, or the node was lost
        raise DistributedError(
            f"--ray: the task writing {files} failed {retries + 1} times "
            f"({type(e).__name__}: {_first_line(e)}); no output was written"
        ) from e


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Stop the other tasks and wait for them, so none writes after the staging is removed."""
    for ref in refs:
        with contextlib.suppress(Exception):  # already finished
            ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=60)


def _check_shards(folder: Path, shards: list[list[TensorSlot]]) -> None:
    for shard in shards:
        if not shard:
            continue
        path = folder / shard[0].file
        if not path.is_file() or path.stat().st_size != shard_bytes(shard):
            raise DistributedError(
                f"--ray: shard '{shard[0].file}' is missing or incomplete in '{folder}' after "
                "its task finished; is the output on a filesystem every node shares?"
            )


def _merge_part(plan: Any, final: Any, part: _Part, execution: Any, with_checks: bool) -> Any:
    """Ray task: compute and write the shards of ``part``; returns its task-vector checks."""
    from alloykit.execute import execute
    from alloykit.inspect.merge_checks import TaskVectorChecks
    from alloykit.io.writer import ShardWriter
    from alloykit.pipeline import open_models

    staging = Path(part.staging)
    if not staging.is_dir():
        raise DistributedError(
            f"--ray: the staging folder '{staging}' is not visible on this node; put the "
            "output on a filesystem every node mounts at the same path"
        )
    owned = {slot.name for shard in part.shards for slot in shard}
    part_plan = dataclasses.replace(plan, jobs=[j for j in plan.jobs if j.output in owned])
    checks = TaskVectorChecks(list(plan.models)) if with_checks else None
    private = staging / f".part-{part.index}-{uuid.uuid4().hex[:12]}"
    private.mkdir()
    written = [0]

    def done(_job: Any) -> None:
        written[0] += 1
        if part.fault is not None and written[0] == 1:  # dies with its shard half-written
            part.fault.strike(part.index)

    provided: Mapping[str, Checkpoint] = {
        label: Checkpoint(Path(folder), label) for label, folder in part.stage_folders.items()
    }
    try:
        with (
            open_models(final, provided) as checkpoints,
            ShardWriter(private, part.shards) as writer,
        ):
            observe = checks.observe if checks is not None else None
            execute(part_plan, checkpoints, writer, execution, done, observe)
            writer.finish(index=False)
        for shard in part.shards:
            os.replace(private / shard[0].file, staging / shard[0].file)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        for checkpoint in provided.values():
            checkpoint.close()
    return checks
