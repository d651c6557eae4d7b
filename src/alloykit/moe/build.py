"""Assembling a mixture-of-experts model from a base and dense experts, tensor by tensor.

The output's attention, norms, embeddings and head are the base model's tensors; each layer's
experts are the dense experts' MLP projections of that layer, copied (bit for bit unless
``noise_scale``, ``residual_scale`` or ``dtype`` change them); the routers come from
:mod:`alloykit.moe.gates`. The output is written by the same atomic shard writer as a merge:
one output tensor (a layer's stacked experts, for fused layouts) and one input tensor in memory
at a time, and the folder appears only when complete.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from alloykit.config import MergeConfig, ModelRef
from alloykit.errors import IncompatibleModels
from alloykit.execute import job_seed, resolve_device
from alloykit.io.checkpoint import DTYPE_CODES, Checkpoint
from alloykit.io.writer import (
    OutputFolder,
    ShardWriter,
    check_output_folder,
    copy_donor_files,
    layout_shards,
    parse_size,
    write_config,
)
from alloykit.moe.config import Expert, MoEConfig, base_merge_config, load_moe_config
from alloykit.moe.gates import degenerate_warning, gate_weights
from alloykit.moe.layout import DENSE_MLP, Piece
from alloykit.moe.plan import Inputs, MoEPlan, open_inputs, plan_inputs

log = logging.getLogger("alloykit")
RECIPE_FILE = "alloykit_moe_config.yml"


@dataclass(frozen=True)
class MoEOptions:
    """Options of an MoE build (the flags of ``alloykit moe``).

    Args:
        device: where the ``hidden`` gate mode runs the base model: cpu, cuda or auto.
        seed: seed of the random gate modes and of ``noise_scale``; None draws one.
        out_shard_size: largest output shard (``5B`` = 5x10^9 bytes, ``500MB``, ``2GiB``).
        copy_tokenizer: copy the base model's tokenizer files (default True).
        overwrite: replace an existing non-empty output folder.
    """

    device: str = "cpu"
    seed: int | None = None
    out_shard_size: str | int = "5B"
    copy_tokenizer: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class MoEResult:
    """What an MoE build wrote."""

    output: Path
    architecture: str
    experts: int
    experts_per_token: int
    files: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)


def build_moe(
    config: MoEConfig | str | Path | Mapping[str, Any],
    out_dir: str | Path,
    options: MoEOptions | None = None,
) -> MoEResult:
    """Build the MoE model ``config`` describes and write it to ``out_dir``.

    The folder holds the shards, ``config.json`` (a Mixtral, Qwen2-MoE or Qwen3-MoE config),
    the base's generation config and tokenizer, and ``alloykit_moe_config.yml`` (the config
    with absolute paths, which this function accepts back). It appears only when complete.

    Raises:
        ConfigError: the config is invalid (every problem listed with its YAML path).
        IncompatibleModels: experts of another architecture or size than the base, or an
            output architecture that cannot take them.

    Example:
        >>> result = build_moe("moe.yml", "moe-model")  # doctest: +SKIP
        >>> result.architecture  # doctest: +SKIP
        'mixtral'
    """
    started = time.perf_counter()
    options = options or MoEOptions()
    cfg = load_moe_config(config)
    out = Path(out_dir)
    check_output_folder(out, overwrite=options.overwrite)
    max_shard = parse_size(options.out_shard_size)
    device = resolve_device(options.device)
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    with ExitStack() as stack:
        inputs = open_inputs(cfg, stack)
        plan = plan_inputs(cfg, inputs)
        gates = _gates(plan, cfg, inputs, seed, device)
        for warning in plan.warnings:
            log.warning(warning)
        shards = layout_shards(
            [(p.output, p.shape, DTYPE_CODES[plan.dtype]) for p in plan.pieces], max_shard
        )
        with OutputFolder(out, overwrite=options.overwrite) as folder:
            with ShardWriter(folder.path, shards) as writer:
                _write_tensors(plan, gates, inputs, cfg, writer, options, seed)
                writer.finish()
            write_config(folder.path, plan.config, str(plan.dtype).removeprefix("torch."))
            copy_donor_files(
                folder.path, inputs.base.folder, tokenizer=options.copy_tokenizer, code=False
            )
            header = f"# alloykit moe recipe: alloykit moe {RECIPE_FILE} OUT\n"
            (folder.path / RECIPE_FILE).write_text(header + portable_moe_config(cfg).to_yaml())
            files = sorted(p.name for p in folder.path.iterdir())
            folder.commit()
    seconds = time.perf_counter() - started
    return MoEResult(
        out,
        plan.architecture,
        len(cfg.experts),
        cfg.experts_per_token,
        files,
        seconds,
        plan.warnings,
    )


def _gates(
    plan: MoEPlan, cfg: MoEConfig, inputs: Inputs, seed: int, device: torch.device
) -> torch.Tensor:
    """The routers, (layers, experts + shared, hidden) float32; warns about degenerate ones."""
    gates = gate_weights(
        cfg.gate_mode,
        [*cfg.experts, *(cfg.shared_experts or [])],
        inputs.base,
        layers=plan.layers,
        hidden=plan.hidden,
        seed=seed,
        device=device,
    )
    warning = degenerate_warning(gates[:, : len(cfg.experts)])
    if warning:
        plan.warnings.append(warning)
    return gates


def _write_tensors(
    plan: MoEPlan,
    gates: torch.Tensor,
    inputs: Inputs,
    cfg: MoEConfig,
    writer: ShardWriter,
    options: MoEOptions,
    seed: int,
) -> None:
    """Write every output tensor: experts, routers and the base's tensors (or base_merge's)."""
    trunk_recipe = base_merge_config(cfg)
    for piece in plan.pieces:
        if trunk_recipe is not None and piece.kind == "trunk":
            continue  # merged below
        writer.write(piece.output, _make(piece, inputs, cfg, gates, plan.dtype, seed))
    if trunk_recipe is not None:
        trunk = [p for p in plan.pieces if p.kind == "trunk"]
        sink = _CastingSink(writer, plan.dtype)
        _merge_trunk(trunk_recipe, trunk, plan.base_type, sink, options, seed)


class _CastingSink:
    """Passes merged tensors to the writer in the output dtype."""

    def __init__(self, writer: ShardWriter, dtype: torch.dtype) -> None:
        self.writer = writer
        self.dtype = dtype

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor.to(self.dtype))


def _merge_trunk(
    recipe: MergeConfig,
    pieces: list[Piece],
    base_type: str,
    sink: _CastingSink,
    options: MoEOptions,
    seed: int,
) -> None:
    """Merge the non-expert tensors with ``base_merge``'s recipe, straight into the output.

    Only the jobs for those tensors run: the dense MLPs the merge would also make are skipped.
    """
    from alloykit.execute import ExecutionOptions, execute
    from alloykit.pipeline import open_models
    from alloykit.plan import build_plan

    with open_models(recipe) as checkpoints:
        for label, checkpoint in checkpoints.items():
            model_type = (checkpoint.config or {}).get("model_type", base_type)
            if model_type != base_type:
                raise IncompatibleModels(
                    f"base_merge: model '{label}' is a '{model_type}' model and the base a "
                    f"'{base_type}' one; merge models of the base model's architecture"
                )
        plan = build_plan(recipe, checkpoints)
        jobs = {job.output: job for job in plan.jobs}
        chosen = []
        for piece in pieces:
            job = jobs.get(piece.source or "")
            if job is None or job.shape != piece.shape:
                found = "makes no such tensor" if job is None else f"makes it {job.shape}"
                raise IncompatibleModels(
                    f"base_merge: the MoE takes tensor '{piece.source}' {piece.shape} from this "
                    f"merge, which {found}; merge models of the base model's architecture and size"
                )
            chosen.append(job)
        for warning in plan.warnings:
            log.warning(f"base_merge: {warning}")
        execution = ExecutionOptions(device=options.device, seed=seed)
        execute(replace(plan, jobs=chosen), checkpoints, sink, execution)


def _make(
    piece: Piece,
    inputs: Inputs,
    cfg: MoEConfig,
    gates: torch.Tensor,
    dtype: torch.dtype,
    seed: int,
) -> torch.Tensor:
    """The output tensor ``piece`` describes, in ``dtype``."""
    routed = len(cfg.experts)
    if piece.kind == "trunk":
        assert piece.source is not None
        return inputs.base.read(piece.source).to(dtype)
    if piece.kind == "zeros":
        return torch.zeros(piece.shape, dtype=dtype)
    if piece.kind == "router":
        assert piece.layer is not None
        return gates[piece.layer, :routed].to(dtype)
    if piece.kind == "shared_router":
        assert piece.layer is not None
        return gates[piece.layer, routed:].to(dtype)
    return _experts_tensor(piece, inputs, cfg, dtype, seed)


def _experts_tensor(
    piece: Piece, inputs: Inputs, cfg: MoEConfig, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """Experts' projections written into one output tensor (a fused layer, or one expert's)."""
    out = torch.empty(piece.shape, dtype=dtype)
    rows = out if piece.fused else out.unsqueeze(0)  # (experts, out features, in features)
    for slot, ref in enumerate(piece.experts):
        if ref == "shared":
            assert inputs.shared is not None and cfg.shared_experts
            checkpoint, spec, key = inputs.shared, cfg.shared_experts[0], "shared"
        else:
            checkpoint, spec, key = inputs.experts[ref], cfg.experts[ref], f"expert{ref}"
        start = 0
        for role in piece.roles:
            name = piece.layer_prefix + DENSE_MLP.format(role=role)
            tensor = _expert_projection(
                checkpoint, spec, name, role, job_seed(seed, f"{key}/{name}")
            )
            target = rows[slot, start : start + tensor.shape[0]]
            if target.shape != tensor.shape:
                raise IncompatibleModels(
                    f"output tensor '{piece.output}' {piece.shape} cannot hold '{name}' "
                    f"{tuple(tensor.shape)} of '{checkpoint.label}'; this transformers version "
                    "lays out experts in a way alloykit does not know"
                )
            target.copy_(tensor)
            start += tensor.shape[0]
        if start != rows.shape[1]:
            raise IncompatibleModels(
                f"output tensor '{piece.output}' {piece.shape} is not the experts' "
                f"{'+'.join(piece.roles)} projections stacked; this transformers version lays "
                "out experts in a way alloykit does not know"
            )
    return out


def _expert_projection(
    checkpoint: Checkpoint, spec: Expert, name: str, role: str, seed: int
) -> torch.Tensor:
    """A dense projection as stored, or with the expert's noise and residual scale applied."""
    tensor = checkpoint.read(name)
    scale = spec.residual_scale if role == "down" else None
    if not spec.noise_scale and scale is None:
        return tensor  # copied as stored: bit for bit when the dtype is kept
    work = tensor.float()
    if spec.noise_scale:
        generator = torch.Generator().manual_seed(seed)
        work += torch.randn(work.shape, generator=generator) * spec.noise_scale
    if scale is not None:
        work *= scale
    return work


def portable_moe_config(cfg: MoEConfig) -> MoEConfig:
    """The config with local model folders made absolute, so it runs again from anywhere."""

    def absolute(ref: ModelRef) -> ModelRef:
        local = Path(ref.path).expanduser()
        return ref.model_copy(update={"path": str(local.resolve())}) if local.exists() else ref

    data = cfg.model_copy(deep=True)
    data.base_model = absolute(data.base_model)
    recipe = base_merge_config(cfg)
    if recipe is not None:
        from alloykit.pipeline import portable_recipe

        data.base_merge = yaml.safe_load(portable_recipe(recipe).to_yaml())
    for expert in [*data.experts, *(data.shared_experts or [])]:
        expert.source_model = absolute(expert.source_model)
    return data
