"""The ``alloykit align`` verbs: read models, find their permutations, write the result.

Permutation alignment is the one place where alloykit holds whole models in memory: every
round of coordinate descent reads every permuted tensor of both models (N models for
MergeMany), so each is read once, up front, and kept. The output is written through the same
atomic output folder as a merge: it appears only when complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import AlloyError, IncompatibleModels
from alloykit.io.checkpoint import DTYPE_CODES, Checkpoint, open_checkpoint
from alloykit.io.writer import (
    OutputFolder,
    ShardWriter,
    check_output_folder,
    copy_donor_files,
    layout_shards,
    parse_size,
    write_config,
)
from alloykit.rebasin.infer import infer_spec
from alloykit.rebasin.matching import mean_state, merge_many, weight_matching
from alloykit.rebasin.spec import Permutations, PermutationSpec, apply_permutations, load_spec

PERMUTATIONS_FILE = "permutations.json"


@dataclass(frozen=True)
class AlignOptions:
    """How to align and what to write (``alloykit align --help`` documents each)."""

    seed: int = 0
    max_iter: int = 100
    spec: Path | None = None  # a YAML permutation spec; inferred when None
    interpolate: float | None = None  # write (1 - t) * reference + t * aligned model
    calibration: Path | None = None  # inputs for BatchNorm reset / REPAIR
    module: str | None = None  # FILE.py:FUNCTION building the torch module
    repair: bool = False  # REPAIR instead of (or besides) BatchNorm reset
    batch_size: int = 256
    overwrite: bool = False
    out_shard_size: str = "5B"
    copy_tokenizer: bool = True


@dataclass(frozen=True)
class AlignResult:
    """What an alignment wrote and found."""

    output: Path
    spec: PermutationSpec
    rounds: int
    converged: bool
    distance_before: float  # L2 distance between the models' permuted tensors, before
    distance_after: float  # ... and after alignment (MergeMany: mean distance to the mean)
    files: list[str] = field(default_factory=list)
    models: int = 2  # how many models were aligned
    calibrated: list[str] = field(default_factory=list)  # "batchnorm reset (3 layers)", ...


def read_state(path: Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """Every tensor of a model folder or state-dict file (kept open for its config and files)."""
    checkpoint = open_checkpoint(path)
    return checkpoint, {name: checkpoint.read(name) for name in checkpoint.tensors}


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


def _check_same_tensors(
    states: Sequence[Mapping[str, torch.Tensor]], labels: Sequence[str]
) -> None:
    """Raise IncompatibleModels naming the first tensor whose presence or shape differs."""
    first = _shapes(states[0])
    for state, label in zip(states[1:], labels[1:], strict=True):
        shapes = _shapes(state)
        for name in sorted(set(first) | set(shapes)):
            if name not in shapes or name not in first:
                holder, lacking = (labels[0], label) if name in first else (label, labels[0])
                raise IncompatibleModels(
                    f"tensor '{name}' is in model '{holder}' but not in '{lacking}'; "
                    "alignment needs models of one architecture"
                )
            if shapes[name] != first[name]:
                raise IncompatibleModels(
                    f"tensor '{name}' has shape {list(first[name])} in '{labels[0]}' and "
                    f"{list(shapes[name])} in '{label}'; alignment needs models of one architecture"
                )


def model_spec(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None,
    label: str,
    spec_file: Path | None,
) -> PermutationSpec:
    """The YAML spec when one is given, else the inferred one."""
    shapes = _shapes(state)
    if spec_file is not None:
        return load_spec(spec_file, shapes, label)
    return infer_spec(shapes, config, label)


def describe_spec(path: Path, spec_file: Path | None = None) -> PermutationSpec:
    """The spec ``alloykit align`` would use for the model at ``path``; reads no tensor data."""
    if not path.exists():
        raise AlloyError(f"model '{path}' not found")
    if spec_file is not None and not spec_file.is_file():
        raise AlloyError(f"permutation spec '{spec_file}' not found")
    with open_checkpoint(path) as checkpoint:
        shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
        if spec_file is not None:
            return load_spec(spec_file, shapes, str(path))
        return infer_spec(shapes, checkpoint.config, str(path))


def _distance(
    spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]
) -> float:
    """L2 distance between two models over the tensors the spec permutes."""
    total = sum(
        float(((a[n].to(torch.float64) - b[n].to(torch.float64)) ** 2).sum()) for n in spec.axes
    )
    return total**0.5


def align(
    reference: Path, model: Path, out: Path, options: AlignOptions | None = None
) -> AlignResult:
    """Permute ``model``'s hidden units to match ``reference`` and write it to ``out``.

    Weight matching (Ainsworth et al. 2023, arXiv:2209.04836, Algorithm 1). The output computes
    the same function as ``model``; with ``options.interpolate = t`` it is instead the
    interpolation ``(1 - t) * reference + t * aligned``, optionally repaired on calibration data.
    ``out/permutations.json`` records each group's permutation.
    """
    options = options or AlignOptions()
    _check_options(options, [reference, model], out, merging=options.interpolate is not None)
    ref_checkpoint, ref_state = read_state(reference)
    with ref_checkpoint:
        model_checkpoint, state = read_state(model)
        with model_checkpoint:
            labels = [str(reference), str(model)]
            _check_same_tensors([ref_state, state], labels)
            spec = model_spec(state, model_checkpoint.config, labels[1], options.spec)
            found = weight_matching(
                spec, ref_state, state, seed=options.seed, max_iter=options.max_iter
            )
            aligned = apply_permutations(spec, found.perms, state)
            result_state = aligned
            calibrated: list[str] = []
            if options.interpolate is not None:
                t = options.interpolate
                mixed = mean_state([ref_state, aligned], weights=[1 - t, t])
                result_state = _like(mixed, state)
                calibrated = _calibrate(result_state, [ref_state, aligned], [1 - t, t], options)
            files = _write(
                out,
                result_state,
                model_checkpoint,
                {"perms": _perms_json(found.perms), "reference": labels[0], "model": labels[1]},
                options,
            )
    return AlignResult(
        out,
        spec,
        found.rounds,
        found.converged,
        _distance(spec, ref_state, state),
        _distance(spec, ref_state, aligned),
        files,
        2,
        calibrated,
    )


def align_many(
    models: Sequence[Path], out: Path, options: AlignOptions | None = None
) -> AlignResult:
    """MergeMany: align ``models`` to one another and write their mean to ``out``.

    Ainsworth et al. 2023 (arXiv:2209.04836), Appendix, Algorithm 3. The first model's config
    and tokenizer go with the output; ``permutations.json`` holds every model's permutations.
    """
    options = options or AlignOptions()
    if len(models) < 2:
        raise AlloyError("--merge-many needs at least two models")
    _check_options(options, list(models), out, merging=True)
    checkpoints: list[Checkpoint] = []
    try:
        states = []
        for path in models:
            checkpoint, state = read_state(path)
            checkpoints.append(checkpoint)
            states.append(state)
        labels = [str(p) for p in models]
        _check_same_tensors(states, labels)
        spec = model_spec(states[0], checkpoints[0].config, labels[0], options.spec)
        found = merge_many(spec, states, seed=options.seed, max_iter=options.max_iter)
        merged = found.mean()
        weights = [1 / len(models)] * len(models)
        calibrated = _calibrate(merged, found.aligned, weights, options)
        files = _write(
            out,
            merged,
            checkpoints[0],
            {"models": labels, "perms": [_perms_json(p) for p in found.perms]},
            options,
        )
        mean_before = mean_state(states)
        before = sum(_distance(spec, mean_before, s) for s in states) / len(states)
        after = sum(_distance(spec, mean_state(found.aligned), s) for s in found.aligned) / len(
            states
        )
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    return AlignResult(
        out, spec, found.rounds, found.converged, before, after, files, len(states), calibrated
    )


def _check_options(
    options: AlignOptions, models: Sequence[Path], out: Path, *, merging: bool
) -> None:
    """Refuse inconsistent options, missing inputs and a used output before reading any tensor."""
    check_output_folder(out, overwrite=options.overwrite)
    if options.max_iter < 1:
        raise AlloyError(f"--max-iter {options.max_iter}: give at least 1")
    if options.interpolate is not None and not 0 <= options.interpolate <= 1:
        raise AlloyError(f"--interpolate {options.interpolate}: give a value in [0, 1]")
    if options.calibration is not None and options.module is None:
        raise AlloyError(
            "--calibration needs --module FILE.py:FUNCTION, a function that builds the model "
            "the weights belong to"
        )
    if options.repair and options.calibration is None:
        raise AlloyError("--repair needs calibration inputs: pass --calibration FILE")
    if options.calibration is not None and not merging:
        raise AlloyError(
            "--calibration repairs a merged model: add --interpolate T (or use --merge-many); "
            "a permuted model alone computes the same function and needs no repair"
        )
    if options.calibration is not None and not options.calibration.is_file():
        raise AlloyError(f"calibration file '{options.calibration}' not found")
    if options.module is not None:
        from alloykit.rebasin.repair import load_builder

        load_builder(options.module)  # a bad FILE.py:FUNCTION fails before any tensor is read
    if options.spec is not None and not options.spec.is_file():
        raise AlloyError(f"permutation spec '{options.spec}' not found")
    for path in models:
        if not path.exists():
            raise AlloyError(f"model '{path}' not found")


def _like(
    state: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with each tensor in the dtype of the same tensor of ``dtypes``."""
    return {name: tensor.to(dtypes[name].dtype) for name, tensor in state.items()}


def _calibrate(
    state: dict[str, torch.Tensor],
    endpoints: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    options: AlignOptions,
) -> list[str]:
    """BatchNorm reset and/or REPAIR of ``state`` in place; what was done, for the report."""
    if options.calibration is None or options.module is None:
        return []
    from alloykit.rebasin.repair import batches, load_builder, load_inputs, repair, reset_batchnorm

    builder = load_builder(options.module)
    data = batches(load_inputs(options.calibration), options.batch_size)
    merged = _build(builder, state, options.module)
    done = []
    if options.repair:
        ends = [_build(builder, e, options.module) for e in endpoints]
        done.append(f"REPAIR ({repair(merged, ends, weights, data)} layers)")
    count = reset_batchnorm(merged, data)
    if count:
        done.append(f"batchnorm reset ({count} layers)")
    elif not options.repair:
        raise AlloyError(
            f"--calibration: the model built by '{options.module}' has no BatchNorm layer to "
            "reset; pass --repair to renormalise its units instead"
        )
    for name, tensor in merged.state_dict().items():
        state[name] = tensor.to(state[name].dtype)
    return done


def _build(builder: Any, state: Mapping[str, torch.Tensor], reference: str) -> torch.nn.Module:
    """The user's module loaded with ``state``; AlloyError naming the keys when they differ."""
    module = builder()
    if not isinstance(module, torch.nn.Module):
        raise AlloyError(
            f"--module '{reference}' returned {type(module).__name__}, not a torch module"
        )
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise AlloyError(
            f"--module '{reference}': its state dict does not match the models' tensors ({first})"
        ) from e
    return module


def _perms_json(perms: Permutations) -> dict[str, list[int]]:
    return {name: index.tolist() for name, index in sorted(perms.items())}


def _write(
    out: Path,
    state: Mapping[str, torch.Tensor],
    donor: Checkpoint,
    record: dict[str, Any],
    options: AlignOptions,
) -> list[str]:
    """Write ``state`` as a model folder (donor's config and tokenizer), atomically."""
    names = list(donor.tensors)
    tensors = [(n, tuple(state[n].shape), DTYPE_CODES[state[n].dtype]) for n in names]
    shards = layout_shards(tensors, parse_size(options.out_shard_size))
    with OutputFolder(out, overwrite=options.overwrite) as folder:
        with ShardWriter(folder.path, shards) as writer:
            for name in names:
                writer.write(name, state[name].contiguous())
            writer.finish()
        if donor.config is not None:
            floating = [t.dtype for t in state.values() if t.is_floating_point()]
            dtype = str(floating[0] if floating else torch.float32).removeprefix("torch.")
            write_config(folder.path, donor.config, dtype)
        if donor.folder.is_dir():
            copy_donor_files(
                folder.path, donor.folder, tokenizer=options.copy_tokenizer, code=False
            )
        (folder.path / PERMUTATIONS_FILE).write_text(json.dumps(record) + "\n")
        files = sorted(p.name for p in folder.path.iterdir())
        folder.commit()
    return files
