"""Running a plan: one job at a time, reading the next job's inputs while computing this one.

Memory is bounded by two jobs' inputs (the current one and the prefetched one) plus one output
tensor; nothing else is kept. Inputs are converted to the working precision once, straight
into the ``(k, *shape)`` stack the method receives. Results go to a sink: the shard writer
(a model folder) or a dict (an in-memory state dict for evaluation and search).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from alloykit.errors import AlloyError, MergeError
from alloykit.io.checkpoint import SAFETENSORS_DTYPES, Checkpoint
from alloykit.methods import Method, MethodInputs
from alloykit.plan import COPY, MergePlan, TensorJob
from alloykit.prepass import needs_model_scope, with_model_thresholds


class TensorSink(Protocol):
    """Where finished tensors go."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...


class StateDictSink(dict[str, torch.Tensor]):
    """A sink that keeps every output tensor in memory (a state dict)."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor


InputsHook = Callable[[TensorJob, torch.Tensor, torch.Tensor | None], None]


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
) -> None:
    """Run every job of ``plan``, in order, writing each result to ``sink``.

    ``on_inputs(job, tensors, base)`` sees each job's inputs (``(k, *shape)`` in working
    precision, and the base or None) before the method runs; it must not modify them.
    """
    options = options or ExecutionOptions()
    device = resolve_device(options.device)
    work_dtype = {"float32": torch.float32, "float64": torch.float64}[options.precision]
    load_dtype = getattr(torch, plan.load_dtype) if plan.load_dtype else None
    if options.threads:
        torch.set_num_threads(options.threads)
    seed = options.seed if options.seed is not None else secrets.randbits(63)  # no global RNG

    def load(job: TensorJob) -> _Loaded:
        def read(model: str, tensor: str) -> torch.Tensor:
            value = checkpoints[model].read(tensor)
            return value.to(load_dtype) if load_dtype is not None else value

        if job.method == COPY:
            (only,) = job.inputs
            return _Loaded(job, read(only.model, only.tensor).unsqueeze(0), None)
        stack = torch.empty((len(job.inputs), *job.shape), dtype=work_dtype, device=device)
        for row, item in enumerate(job.inputs):
            stack[row].copy_(read(item.model, item.tensor))
        base = None
        if job.base is not None:
            base = read(job.base.model, job.base.tensor).to(device=device, dtype=work_dtype)
        return _Loaded(job, stack, base)

    jobs = plan.jobs
    if needs_model_scope(plan.kernel, jobs):  # model-wide top-k: two statistics passes first

        def inputs(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor | None]:
            loaded = load(job)
            return loaded.tensors, loaded.base

        jobs = with_model_thresholds(jobs, inputs)
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloykit-read") as reader:
        pending = reader.submit(load, jobs[0])
        for index in range(len(jobs)):
            loaded = pending.result()
            if index + 1 < len(jobs):
                pending = reader.submit(load, jobs[index + 1])
            if on_inputs is not None:
                on_inputs(loaded.job, loaded.tensors, loaded.base)
            sink.write(loaded.job.output, _compute(plan.kernel, loaded, seed, device))
            if on_job_done is not None:
                on_job_done(loaded.job)
            del loaded


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
) -> MethodInputs:
    """What the method kernel receives for ``job``: its per-model parameters as tensors."""
    per_model = {
        name: torch.tensor(values, dtype=torch.float64) for name, values in job.per_model.items()
    }
    return MethodInputs(tensors, base, per_model, job.params, generator)


def _compute(method: Method, loaded: _Loaded, seed: int, device: torch.device) -> torch.Tensor:
    job = loaded.job
    out_dtype = SAFETENSORS_DTYPES[job.dtype]
    if job.method == COPY:
        return loaded.tensors[0].to(out_dtype)
    inputs = method_inputs(job, loaded.tensors, loaded.base, job_generator(seed, job, device))
    result = method.run(inputs).to(device="cpu", dtype=out_dtype)
    finite = torch.isfinite(result)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise MergeError(
            f"tensor '{job.output}': {job.method} produced {bad} non-finite values (NaN or inf, "
            f"in {str(out_dtype).removeprefix('torch.')}); check the inputs for NaN and the weights and parameters for "
            "extreme values"
        )
    return result
