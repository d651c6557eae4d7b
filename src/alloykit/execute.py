"""Running a plan: one job at a time, reading the next job's inputs while computing this one.

Memory is bounded by two jobs' inputs (the current one and the prefetched one) plus one output
tensor; nothing else is kept. Inputs are converted to the working precision once, straight
into the ``(k, *shape)`` stack the method receives. Results go to a sink: the shard writer
(a model folder) or a dict (an in-memory state dict for evaluation and search).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from alloykit._memory import tune_malloc
from alloykit.calibration import StatisticsFile, model_statistics
from alloykit.errors import AlloyError, CalibrationError, MergeError
from alloykit.io.checkpoint import SAFETENSORS_DTYPES, Checkpoint
from alloykit.methods import Method, MethodInputs
from alloykit.methods.data_aware import aim
from alloykit.plan import COPY, MergePlan, TensorJob
from alloykit.prepass import needs_model_scope, with_model_thresholds
from alloykit.tokenizer import align_into, default_rows, merge_holders_only


def rounds_exactly(stored: torch.dtype | None, load: torch.dtype | None) -> bool:
    """Whether rounding every value of dtype ``stored`` to ``load`` (the config's ``dtype``;
    None: no rounding) leaves it unchanged, so inputs can be converted straight from the file
    to the working precision. True for the same dtype and for widening float conversions
    (bfloat16 or float16 to float32, any of them to float64): ``load`` is at least as precise
    (``eps``) and reaches at least as far both ways (largest and smallest normal value).

    Example:
        >>> rounds_exactly(torch.bfloat16, torch.float32)
        True
        >>> rounds_exactly(torch.float16, torch.bfloat16)
        False
    """
    if load is None or stored == load:
        return True
    if stored is None or not (stored.is_floating_point and load.is_floating_point):
        return False
    have, want = torch.finfo(stored), torch.finfo(load)
    return (
        want.eps <= have.eps
        and want.max >= have.max
        and want.smallest_normal <= have.smallest_normal
    )


class TensorSink(Protocol):
    """Where finished tensors go."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...


class StateDictSink(dict[str, torch.Tensor]):
    """A sink that keeps every output tensor in memory (a state dict)."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor


InputsHook = Callable[[TensorJob, torch.Tensor, torch.Tensor | None], None]


class TaskVectorSource(Protocol):
    """Task vectors ``x − base`` computed ahead (a recipe search's cache), read per input.

    ``read`` returns the task vector of ``model``'s tensor against ``base``'s, as computed in
    ``work_dtype`` from tensors first converted to ``load_dtype`` (None: as stored), or None
    when it does not hold it (the executor then reads and subtracts as usual).
    """

    def read(
        self,
        model: str,
        tensor: str,
        base: tuple[str, str],
        work_dtype: torch.dtype,
        load_dtype: torch.dtype | None,
    ) -> torch.Tensor | None: ...


def task_vector_jobs(plan: MergePlan) -> list[TensorJob]:
    """The jobs of ``plan`` whose inputs may be given as task vectors.

    Those of a task-vector preset (task_arithmetic, ties, dare_*, breadcrumbs*, della*, ...)
    with a base, outside vocabulary alignment; none when the plan reads calibration statistics
    (data-aware steps, AIM) or ranks magnitudes over the whole model (its prepass reads the
    inputs). Empty for every other method.
    """
    from alloykit.methods import task_vector_preset

    if task_vector_preset(plan.kernel) is None or plan.aim is not None:
        return []
    if plan.calibration is not None and plan.kernel.statistics is not None:
        return []
    if needs_model_scope(plan.kernel, plan.jobs):
        return []
    return [j for j in plan.jobs if j.method != COPY and j.base is not None and not j.vocabulary]


@dataclass(frozen=True)
class ExecutionOptions:
    """How to run a plan: device, working precision, seed, threads."""

    device: str = "cpu"
    precision: str = "float32"  # float32 or float64
    seed: int | None = None
    threads: int | None = None


@dataclass
class _Loaded:
    job: TensorJob
    tensors: torch.Tensor  # (k, *shape): one row per non-base input
    base: torch.Tensor | None
    statistics: torch.Tensor | None = None  # (k, ...): one calibration statistic per input
    input_axis: int = -1
    activation: torch.Tensor | None = None  # AIM: the base's mean |input| per channel
    aim_base: torch.Tensor | None = None  # AIM: the base's tensor, kept from the method
    holders: torch.Tensor | None = None  # (k, rows): which input has which token (holders_only)
    deltas: bool = False  # tensors holds task vectors (x − base) read from a TaskVectorSource


@dataclass
class _Calibrated:
    """The statistics files a plan reads, opened once (a method's per model, AIM's base's)."""

    per_model: dict[str, StatisticsFile]
    base: StatisticsFile | None
    statistic: str | None  # what per_model holds: the kernel's statistic

    @staticmethod
    def open(
        plan: MergePlan, checkpoints: Mapping[str, Checkpoint], device: torch.device
    ) -> _Calibrated | None:
        calibration = plan.calibration
        if calibration is None or (plan.kernel.statistics is None and plan.aim is None):
            return None
        merged = [j for j in plan.jobs if j.method != COPY]
        per_model: dict[str, StatisticsFile] = {}
        if plan.kernel.statistics is not None:
            for label in sorted({i.model for j in merged for i in j.inputs}):
                statistics = model_statistics(
                    checkpoints[label], plan.kernel.statistics, calibration, device
                )
                names = [i.tensor for j in merged for i in j.inputs if i.model == label]
                _check_names(statistics, names, label)
                per_model[label] = statistics
        base = None
        base_model = plan.base_model
        if plan.aim is not None and plan.aim.strength > 0 and base_model is not None:
            base = model_statistics(checkpoints[base_model], "activation", calibration, device)
            sources = [i for j in merged for i in (j.base, *j.inputs) if i is not None]
            _check_names(base, [i.tensor for i in sources if i.model == base_model], base_model)
        return _Calibrated(per_model, base, plan.kernel.statistics)

    def attach(self, loaded: _Loaded, base_model: str | None) -> None:
        """Add the job's statistics (and AIM's base activation and tensor) to ``loaded``."""
        job = loaded.job
        tensors = loaded.tensors
        if job.method == COPY:
            return
        if self.per_model:
            rows = [self.per_model[i.model].read(i.tensor) for i in job.inputs]
            if self.statistic == "fisher" and any(
                r is not None and r.shape != tensors.shape[1:] for r in rows
            ):  # rows re-indexed to another vocabulary: the Fishers no longer line up
                rows = []
            if rows and all(r is not None for r in rows):
                stack = torch.stack([r for r in rows if r is not None])
                loaded.statistics = stack.to(device=tensors.device)
                if job.params.get("normalize") and self.statistic == "fisher":
                    # Matena & Raffel's c_i ∝ 1/‖F_i‖: each model's whole Fisher at unit norm
                    norms = tuple(self.per_model[i.model].norm for i in job.inputs)
                    per_model = {**job.per_model, "statistics_norm": norms}
                    loaded.job = dataclasses.replace(job, per_model=per_model)
                loaded.input_axis = self.per_model[job.inputs[0].model].input_axis(
                    job.inputs[0].tensor
                )
        if self.base is None:
            return
        if job.base is not None:
            base_name, base_tensor = job.base.tensor, loaded.base
        else:  # the base is one of the inputs (linear and other "input" methods)
            row = next((r for r, i in enumerate(job.inputs) if i.model == base_model), None)
            if row is None:
                return
            base_name, base_tensor = job.inputs[row].tensor, tensors[row].clone()
        activation = self.base.read(base_name)
        if activation is not None and base_tensor is not None:
            loaded.activation = activation.to(device=tensors.device)
            loaded.aim_base = base_tensor
            loaded.input_axis = self.base.input_axis(base_name)


def _check_names(statistics: StatisticsFile, names: list[str], label: str) -> None:
    """Refuse statistics whose names match none of the model's merged tensors.

    ``transformers`` renames some legacy checkpoints' parameters when it loads them; were that
    to happen to every tensor, the method would silently fall back to an average.
    """
    if names and all(statistics.read(name) is None for name in names):
        raise CalibrationError(
            f"model '{label}': none of its tensors (e.g. '{names[0]}') matches the names of its "
            f"calibration statistics in '{statistics.path}' (transformers renamed its "
            "parameters on loading); resave the model with save_pretrained and merge that"
        )


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise AlloyError(f"--device '{name}' is not a device (use cpu, cuda or auto)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlloyError("--device cuda: no CUDA device is available here (use cpu or auto)")
    return device


def job_seed(seed: int, output: str) -> int:
    """A per-tensor seed: the same tensor gets the same random numbers in any job order."""
    digest = hashlib.sha256(f"{seed}\x1f{output}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def execute(
    plan: MergePlan,
    checkpoints: Mapping[str, Checkpoint],
    sink: TensorSink,
    options: ExecutionOptions | None = None,
    on_job_done: Callable[[TensorJob], None] | None = None,
    on_inputs: InputsHook | None = None,
    task_vectors: TaskVectorSource | None = None,
) -> None:
    """Run every job of ``plan``, in order, writing each result to ``sink``.

    ``on_inputs(job, tensors, base)`` sees each job's inputs (``(k, *shape)`` in working
    precision, and the base or None) before the method runs; it must not modify them nor keep
    references to them (their memory is reused for later jobs' inputs while a result is being
    written), and it is not called for jobs whose inputs come from ``task_vectors``. Results
    are written by a writer thread, in job order, one at a time; job i's result may still be
    being written when ``on_inputs`` sees job i + 1 (a sink that is also the hook keys what
    it keeps by output name), and ``on_job_done(job)`` is called once the job's result is
    written. ``task_vectors`` gives the
    :func:`task_vector_jobs` their task vectors ready-made; the result is the same bits.
    """
    options = options or ExecutionOptions()
    device = resolve_device(options.device)
    work_dtype = {"float32": torch.float32, "float64": torch.float64}[options.precision]
    load_dtype = getattr(torch, plan.load_dtype) if plan.load_dtype else None
    if options.threads:
        torch.set_num_threads(options.threads)
    seed = options.seed if options.seed is not None else secrets.randbits(63)  # no global RNG
    calibrated = _Calibrated.open(plan, checkpoints, device)  # measured once per model, then cached
    from_vectors = {j.output for j in task_vector_jobs(plan)} if task_vectors is not None else set()

    pool: _InputPool | None = None  # set before the main loop (the prepass allocates its own)

    def load(job: TensorJob, slot: int | None = None) -> _Loaded:
        def read(model: str, tensor: str) -> torch.Tensor:
            value = checkpoints[model].read(tensor)
            return value.to(load_dtype) if load_dtype is not None else value

        def read_into(model: str, tensor: str, out: torch.Tensor) -> None:
            checkpoint = checkpoints[model]
            if isinstance(checkpoint, Checkpoint) and rounds_exactly(
                checkpoint.stored_dtype(tensor), load_dtype
            ):
                checkpoint.read_into(tensor, out)  # no whole-tensor copy of the raw data
            else:
                out.copy_(read(model, tensor))

        if job.vocabulary:
            return load_aligned(job, read)
        if job.method == COPY:
            (only,) = job.inputs
            return _Loaded(job, read(only.model, only.tensor).unsqueeze(0), None)
        shapes = [(len(job.inputs), *job.shape), *([job.shape] if job.base is not None else [])]
        if pool is not None and slot is not None:
            stack, *rest = pool.take(slot, shapes)
        else:
            stack, *rest = [torch.empty(s, dtype=work_dtype, device=device) for s in shapes]
        if job.output in from_vectors and _read_vectors(job, stack):
            assert job.base is not None
            kept = read(job.base.model, job.base.tensor).to(device=device, dtype=work_dtype)
            return _Loaded(job, stack, kept, deltas=True)
        for row, item in enumerate(job.inputs):
            read_into(item.model, item.tensor, stack[row])
        base = None
        if job.base is not None:
            (base,) = rest
            read_into(job.base.model, job.base.tensor, base)
        loaded = _Loaded(job, stack, base)
        if calibrated is not None:
            calibrated.attach(loaded, plan.base_model)
        return loaded

    def _read_vectors(job: TensorJob, stack: torch.Tensor) -> bool:
        """Fill ``stack`` with the job's task vectors; False when the source lacks one."""
        assert task_vectors is not None and job.base is not None
        key = (job.base.model, job.base.tensor)
        for row, item in enumerate(job.inputs):
            vector = task_vectors.read(item.model, item.tensor, key, work_dtype, load_dtype)
            if vector is None:
                return False
            stack[row].copy_(vector)
        return True

    def load_aligned(job: TensorJob, read: Callable[[str, str], torch.Tensor]) -> _Loaded:
        """A vocabulary tensor: every model's rows re-indexed to the output vocabulary."""
        vocabulary = plan.tokenizer.vocabulary if plan.tokenizer is not None else None
        assert vocabulary is not None, f"job '{job.output}' needs the plan's vocabulary"
        items = [*job.inputs, *([job.base] if job.base is not None else [])]
        raw = {item.model: read(item.model, item.tensor) for item in items}
        dtype = SAFETENSORS_DTYPES[job.dtype] if job.method == COPY else work_dtype
        defaults = default_rows(vocabulary, raw, dtype)
        # each model's rows go straight into the stack the method receives, and its raw
        # matrix is dropped once written: memory stays near one copy of the inputs
        stack = torch.empty((len(job.inputs), *job.shape), dtype=dtype, device=device)
        for row, item in enumerate(job.inputs):
            align_into(vocabulary, item.model, raw.pop(item.model), defaults, stack[row])
        base = None
        if job.base is not None:
            base = torch.empty(job.shape, dtype=dtype, device=device)
            align_into(vocabulary, job.base.model, raw.pop(job.base.model), defaults, base)
        del defaults
        holders = None
        if vocabulary.missing_rows == "holders_only" and job.method != COPY:
            masks = [vocabulary.holders(item.model) for item in job.inputs]
            holders = torch.from_numpy(np.stack(masks)).to(device)
        loaded = _Loaded(job, stack, base, holders=holders)
        if calibrated is not None:
            calibrated.attach(loaded, plan.base_model)
        return loaded

    jobs = plan.jobs
    if needs_model_scope(plan.kernel, jobs):  # model-wide top-k: two statistics passes first

        def inputs(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor | None]:
            loaded = load(job)
            return loaded.tensors, loaded.base

        jobs = with_model_thresholds(jobs, inputs)
    if not jobs:
        return
    sizes = [_input_bytes(job, work_dtype) for job in jobs]
    # whole tensors are mapped and returned to the OS when freed; blocks reuse the heap
    tune_malloc(max(_tensor_bytes(job, work_dtype) for job in jobs))
    budget = max(sizes)  # one job's inputs at the largest tensor: what the bound allows
    results = [_tensor_bytes(job, work_dtype) for job in jobs]
    largest_result = max(results)
    pool = _InputPool(budget // work_dtype.itemsize, work_dtype, device)
    writing: Future[TensorJob] | None = None

    def write(job: TensorJob, result: torch.Tensor) -> TensorJob:
        sink.write(job.output, result)
        return job

    def written() -> None:
        # wait for the previous job's write (its errors surface here), then report it done
        nonlocal writing
        if writing is not None:
            job = writing.result()
            writing = None  # the future holds the result: drop it once written
            if on_job_done is not None:
                on_job_done(job)

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloykit-read") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloykit-write") as writer,
    ):
        pending: Future[_Loaded] | None = reader.submit(load, jobs[0], 0)
        for index in range(len(jobs)):
            assert pending is not None
            loaded = pending.result()
            pending = None  # the future holds the inputs too: drop it with them, not later
            following = index + 1 < len(jobs)
            # read the next job's inputs while this one computes only when both fit in the
            # largest job's footprint (small tensors: nearly always; the largest: never)
            ahead = following and sizes[index] + sizes[index + 1] <= budget
            if ahead:
                pending = reader.submit(load, jobs[index + 1], (index + 1) % 2)
            # the previous result is written while this job computes when the two results
            # fit in the largest tensor's room (the peak stays that of the largest job, whose
            # result is never beside another); otherwise it is freed before this job computes
            overlap = index > 0 and results[index - 1] + results[index] <= largest_result
            if not overlap:
                written()
            if on_inputs is not None and not loaded.deltas:
                on_inputs(loaded.job, loaded.tensors, loaded.base)
            strength = plan.aim.strength if plan.aim is not None else 0.0
            result = _compute(plan.kernel, loaded, seed, device, strength)
            if pool.holds(result):  # a method that returned an input row: the pool is reused
                result = result.clone()
            written()  # one result in flight at a time, written in job order
            writing = writer.submit(write, loaded.job, result)
            del result, loaded
            if following and not ahead:
                pending = reader.submit(load, jobs[index + 1], (index + 1) % 2)
        written()


class _InputPool:
    """One buffer, reused by every job for its input stack and base.

    Fresh tensors of this size are mapped anew for each job and faulted in (zeroed by the
    kernel) page by page: on a 1.1B model, a third of a linear merge's time. Job ``i`` takes
    the start of the buffer when ``i`` is even, its end when odd, so a job read ahead never
    overlaps the one computing: read-ahead happens only when both fit in the buffer (the
    largest job's inputs, which the memory bound allows anyway).
    """

    def __init__(self, elements: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = torch.empty(elements, dtype=dtype, device=device)

    def take(self, slot: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        counts = [math.prod(shape) for shape in shapes]
        start = 0 if slot % 2 == 0 else self.buffer.numel() - sum(counts)
        views = []
        for shape, count in zip(shapes, counts, strict=True):
            views.append(self.buffer[start : start + count].view(shape))
            start += count
        return views

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in the pool's memory."""
        return tensor.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()


def _tensor_bytes(job: TensorJob, work_dtype: torch.dtype) -> int:
    """Bytes of one of the job's tensors in the working precision."""
    return math.prod(job.shape) * work_dtype.itemsize


def _input_bytes(job: TensorJob, work_dtype: torch.dtype) -> int:
    """Bytes a job's loaded inputs take: its stack and base in the working precision."""
    return (len(job.inputs) + (job.base is not None)) * _tensor_bytes(job, work_dtype)


def job_generator(seed: int, job: TensorJob, device: torch.device) -> torch.Generator:
    """The random source of one job: the same draws for the same seed and tensor, always."""
    generator = torch.Generator(device=device)
    generator.manual_seed(job_seed(seed, job.output))
    return generator


def method_inputs(
    job: TensorJob,
    tensors: torch.Tensor,
    base: torch.Tensor | None,
    generator: torch.Generator | None,
    statistics: torch.Tensor | None = None,
    input_axis: int = -1,
) -> MethodInputs:
    """What the method kernel receives for ``job``: its per-model parameters as tensors."""
    per_model = {
        name: torch.tensor(values, dtype=torch.float64) for name, values in job.per_model.items()
    }
    return MethodInputs(tensors, base, per_model, job.params, generator, statistics, input_axis)


def _compute(
    method: Method, loaded: _Loaded, seed: int, device: torch.device, aim_strength: float = 0.0
) -> torch.Tensor:
    job = loaded.job
    out_dtype = SAFETENSORS_DTYPES[job.dtype]
    if job.method == COPY:
        return loaded.tensors[0].to(out_dtype)
    inputs = method_inputs(
        job,
        loaded.tensors,
        loaded.base,
        job_generator(seed, job, device),
        loaded.statistics,
        loaded.input_axis,
    )
    if loaded.deltas:  # task vectors given ready-made: the preset's steps after subtraction
        from alloykit.methods import run_on_task_vectors, task_vector_preset

        preset = task_vector_preset(method)
        assert preset is not None
        merged = run_on_task_vectors(inputs, preset=preset)
    elif loaded.holders is not None:  # holders_only: keep the inputs for the per-subset runs
        full = method.run(dataclasses.replace(inputs, tensors=inputs.tensors.clone()))
        merged = merge_holders_only(method.run, inputs, loaded.holders, full, method.min_models)
    else:
        merged = method.run(inputs)
    if loaded.activation is not None and loaded.aim_base is not None:
        merged = aim(merged, loaded.aim_base, loaded.activation, aim_strength, loaded.input_axis)
    result = merged.to(device="cpu", dtype=out_dtype)
    del merged
    # min and max propagate NaN and show ±inf: a check with no tensor-sized temporary
    low, high = torch.aminmax(result) if result.numel() else (torch.zeros(()), torch.zeros(()))
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        bad = int(torch.count_nonzero(~torch.isfinite(result)))
        raise MergeError(
            f"tensor '{job.output}': {job.method} produced {bad} non-finite values (NaN or inf, "
            f"in {str(out_dtype).removeprefix('torch.')}); check the inputs for NaN and the weights and parameters for "
            "extreme values"
        )
    return result
