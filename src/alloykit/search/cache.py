"""Task vectors computed once per search, kept on disk and read back through a memory map.

Every candidate of a search over a task-vector method (task_arithmetic, ties, dare_*,
breadcrumbs*, della*, ...) subtracts the same base from the same fine-tunes. A
:class:`TaskVectorCache` does that once: the first candidate whose plan can use task vectors
(:func:`alloykit.execute.task_vector_jobs`) writes ``δ = x − base`` for each of its inputs, in
the working precision, into one safetensors file under the search's output folder; every later
candidate maps that file (``mmap``, read-only) and copies each task vector straight into the
stack its method receives, skipping the fine-tune's read and the subtraction. The mapped pages
are file-backed: the kernel may drop them under memory pressure, so the cache does not hold
task vectors in the process's own memory.

The task vectors are computed with the executor's own operations in the same order (convert
to the load dtype, copy into working precision, subtract the base in working precision), so a
cached merge gives exactly the bits of an uncached one.

The file is written atomically (:class:`alloykit.io.writer.OutputFolder`) with a manifest
naming each entry and the size and modification time of every input weight file; a resumed
search reuses a cache whose inputs are unchanged and rewrites it otherwise. A search removes
its cache when it finishes and keeps it after a kill, for ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import CheckpointError
from alloykit.execute import ExecutionOptions, TaskVectorSource, task_vector_jobs
from alloykit.io.checkpoint import (
    DTYPE_CODES,
    SAFETENSORS_DTYPES,
    Checkpoint,
    TensorInfo,
    read_safetensors_header,
)
from alloykit.io.writer import OutputFolder, ShardWriter, layout_shards
from alloykit.plan import MergePlan

CACHE_FOLDER = "task_vectors"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
_ONE_FILE = 1 << 62  # shard limit: everything in one file

Key = tuple[str, str, str, str, str, str]  # model, tensor, base model, base tensor, work, load


def _key(
    model: str,
    tensor: str,
    base: tuple[str, str],
    work_dtype: torch.dtype,
    load_dtype: torch.dtype | None,
) -> Key:
    load = "stored" if load_dtype is None else DTYPE_CODES[load_dtype]
    return (model, tensor, base[0], base[1], DTYPE_CODES[work_dtype], load)


class TaskVectorCache:
    """The task vectors of one search, written once into ``folder`` and memory-mapped.

    Pass it to :func:`alloykit.pipeline.merge_in_memory` (``task_vectors=``); ``writes`` counts
    the files it wrote (one per search, none when a resumed search finds a valid cache) and
    ``hits`` the task vectors it served.

    Example:
        >>> cache = TaskVectorCache(Path("runs/s1/task_vectors"))  # doctest: +SKIP
        >>> merged = merge_in_memory(config, options, task_vectors=cache)  # doctest: +SKIP
        >>> cache.remove()  # doctest: +SKIP
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writes = 0
        self.hits = 0
        self._entries: dict[Key, TensorInfo] | None = None
        self._map: mmap.mmap | None = None
        self._decided = False  # whether this search's cache was found or written already

    # -- TaskVectorProvider

    def source(
        self,
        plan: MergePlan,
        checkpoints: Mapping[str, Checkpoint],
        options: ExecutionOptions,
    ) -> TaskVectorSource | None:
        """This cache as the plan's task-vector source (written first when this is the first
        plan that can use one); None when the plan's method takes no task vectors."""
        jobs = task_vector_jobs(plan)
        if not jobs:
            return None
        if not self._decided:
            self._decided = True
            work = {"float32": torch.float32, "float64": torch.float64}[options.precision]
            load = getattr(torch, plan.load_dtype) if plan.load_dtype else None
            fingerprint = _fingerprint(checkpoints, jobs)
            if not self._open(fingerprint):
                self._write(plan, checkpoints, work, load, fingerprint)
                self._open(fingerprint)
        return self if self._entries else None

    def prepare(self, config: Any, options: Any = None) -> bool:
        """Write the cache for a recipe (or find it written) without merging the recipe.

        For a driver that starts several workers on one search: it prepares the cache once,
        and each worker's own ``TaskVectorCache`` on the same folder finds it (``writes`` 0).
        ``options`` is a :class:`alloykit.pipeline.MergeOptions`. Returns whether the recipe
        takes task vectors (a one-stage recipe of a task-vector method).
        """
        from alloykit.pipeline import MergeOptions, _execution, final_inputs
        from alloykit.plan import build_plan
        from alloykit.stages import load_stages

        options = options or MergeOptions()
        if len(load_stages(config, strict=options.strict)) != 1:
            return False
        with final_inputs(config, options) as (stage, checkpoints):
            plan = build_plan(stage, checkpoints, allow_crimes=options.allow_crimes)
            return self.source(plan, checkpoints, _execution(options)) is not None

    # -- TaskVectorSource

    def read(
        self,
        model: str,
        tensor: str,
        base: tuple[str, str],
        work_dtype: torch.dtype,
        load_dtype: torch.dtype | None,
    ) -> torch.Tensor | None:
        """The cached task vector (a read-only view of the mapped file), or None."""
        if self._entries is None or self._map is None:
            return None
        info = self._entries.get(_key(model, tensor, base, work_dtype, load_dtype))
        if info is None:
            return None
        self.hits += 1
        with warnings.catch_warnings():  # the view is read-only; the executor only copies it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset
            )
        return flat.view(SAFETENSORS_DTYPES[info.dtype]).view(info.shape)

    # -- the file

    def _write(
        self,
        plan: MergePlan,
        checkpoints: Mapping[str, Checkpoint],
        work: torch.dtype,
        load: torch.dtype | None,
        fingerprint: dict[str, list[Any]],
    ) -> None:
        """One pass over the plan's task-vector jobs: each ``x − base`` written as computed."""
        jobs = task_vector_jobs(plan)
        entries: list[tuple[Key, str, tuple[int, ...]]] = []
        seen: set[Key] = set()
        for job in jobs:
            assert job.base is not None
            pair = (job.base.model, job.base.tensor)
            for item in job.inputs:
                key = _key(item.model, item.tensor, pair, work, load)
                if key not in seen:
                    seen.add(key)
                    entries.append((key, f"v{len(entries)}", job.shape))
        code = DTYPE_CODES[work]
        shards = layout_shards([(name, shape, code) for _, name, shape in entries], _ONE_FILE)
        names = {key: name for key, name, _ in entries}

        def read(model: str, tensor: str) -> torch.Tensor:
            value = checkpoints[model].read(tensor)
            return value.to(load) if load is not None else value

        written: set[Key] = set()
        with OutputFolder(self.folder, overwrite=True) as folder:
            with ShardWriter(folder.path, shards) as writer:
                for job in jobs:
                    assert job.base is not None
                    base = read(job.base.model, job.base.tensor).to(dtype=work)
                    for item in job.inputs:
                        key = _key(
                            item.model, item.tensor, (job.base.model, job.base.tensor), work, load
                        )
                        if key in written:
                            continue
                        delta = torch.empty(job.shape, dtype=work)
                        delta.copy_(read(item.model, item.tensor))  # as the executor's stack
                        writer.write(names[key], delta.sub_(base))
                        written.add(key)
                writer.finish()
            manifest = {
                "fingerprint": fingerprint,
                "entries": [[*key, name] for key, name, _ in entries],
            }
            (folder.path / MANIFEST).write_text(json.dumps(manifest) + "\n")
            folder.commit()
        self.writes += 1

    def _open(self, fingerprint: dict[str, list[Any]]) -> bool:
        """Map the cache file when it exists and was made from these inputs."""
        self.close()
        manifest_file = self.folder / MANIFEST
        if not manifest_file.is_file():
            return False
        try:
            manifest = json.loads(manifest_file.read_text())
            if manifest["fingerprint"] != json.loads(json.dumps(fingerprint)):
                return False
            infos = read_safetensors_header(self.folder / WEIGHTS)
            entries: dict[Key, TensorInfo] = {
                (row[0], row[1], row[2], row[3], row[4], row[5]): infos[row[6]]
                for row in manifest["entries"]
            }
        except (OSError, ValueError, KeyError, TypeError, IndexError, CheckpointError):
            return False  # missing, damaged or from other inputs: written again
        with (self.folder / WEIGHTS).open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._entries = entries
        return True

    def close(self) -> None:
        """Unmap the file (views still alive keep their pages until released)."""
        self._entries = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view is alive: freed with the tensor
                self._map.close()
            self._map = None

    def remove(self) -> None:
        """Unmap and delete the cache folder."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _fingerprint(checkpoints: Mapping[str, Checkpoint], jobs: list[Any]) -> dict[str, list[Any]]:
    """Per input model: its weight files with their sizes and modification times."""
    labels = sorted(
        {i.model for j in jobs for i in j.inputs} | {j.base.model for j in jobs if j.base}
    )
    result: dict[str, list[Any]] = {}
    for label in labels:
        files = sorted({str(info.file) for info in checkpoints[label].tensors.values()})
        stats = []
        for file in files:
            try:
                stat = Path(file).stat()
                stats.append([file, stat.st_size, stat.st_mtime_ns])
            except OSError:
                stats.append([file, None, None])
        result[label] = stats
    return result
