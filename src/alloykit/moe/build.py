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

from alloykit.architecture import layer_count
from alloykit.config import MergeConfig, ModelRef, normalize_dtype
from alloykit.errors import CheckpointError, IncompatibleModels
from alloykit.execute import job_seed, resolve_device
from alloykit.io.checkpoint import DTYPE_CODES, SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
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
from alloykit.moe.config import Expert, MoEConfig, base_merge_config, load_moe_config
from alloykit.moe.gates import degenerate_warning, gate_weights
from alloykit.moe.layout import (
    DENSE_MLP,
    ROLES,
    Piece,
    choose_architecture,
    meta_parameters,
    output_config,
    plan_pieces,
)

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


@dataclass
class _Inputs:
    base: Checkpoint
    experts: list[Checkpoint]  # routed experts, in config order
    shared: Checkpoint | None


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
        inputs = _open_inputs(cfg, stack)
        plan = _plan(cfg, inputs)
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


@dataclass
class MoEPlan:
    """What a build will write, before any tensor is read: the output architecture and
    config, and a recipe for each output tensor in transformers' parameter order."""

    architecture: str
    config: dict[str, Any]  # config.json without its dtype
    pieces: list[Piece]
    dtype: torch.dtype
    base_type: str
    layers: int
    hidden: int
    gate_mode: str
    experts: list[str]  # the routed experts' model labels
    shared_expert: str | None  # the shared expert's model label
    merged_trunk: bool  # the non-expert tensors come from base_merge, not the base
    warnings: list[str]

    def rows(self) -> list[tuple[str, str, str]]:
        """``(output tensor, shape, where it comes from)`` for each tensor (``--dry-run``)."""
        trunk = "base_merge" if self.merged_trunk else "base_model"
        rows = []
        for piece in self.pieces:
            if piece.kind == "trunk":
                source = trunk if piece.source == piece.output else f"{trunk}: {piece.source}"
            elif piece.kind == "zeros":
                source = "zeros (a bias the base does not have)"
            elif piece.kind == "router":
                source = f"gate_mode {self.gate_mode}"
            elif piece.kind == "shared_router":
                source = f"gate_mode {self.gate_mode} (shared expert)"
            else:
                names = [
                    str(self.shared_expert) if e == "shared" else self.experts[e]
                    for e in piece.experts
                ]
                roles = "+".join(f"{r}_proj" for r in piece.roles)
                source = f"{roles} of {', '.join(names)}"
            rows.append((piece.output, str(list(piece.shape)), source))
        return rows


def plan_moe(config: MoEConfig | str | Path | Mapping[str, Any]) -> MoEPlan:
    """Validate ``config``, check its models and plan the build without reading a tensor
    (what ``alloykit moe --dry-run`` prints); the routers are not computed."""
    cfg = load_moe_config(config)
    with ExitStack() as stack:
        return _plan(cfg, _open_inputs(cfg, stack))


def _plan(cfg: MoEConfig, inputs: _Inputs) -> MoEPlan:
    """Check the models, choose the architecture and read its layout."""
    base = inputs.base
    base_config = base.config or {}
    _check_experts(inputs)
    base_type = str(base_config.get("model_type"))
    shared_specs = list(cfg.shared_experts or [])
    arch = choose_architecture(cfg.architecture, base_type, len(shared_specs))
    layers, _ = layer_count(base_config, base.tensors)
    intermediate, hidden = base.tensors[_mlp_name(base, 0, "gate")].shape
    shared = inputs.shared
    out_config = output_config(
        arch,
        base_config,
        experts=len(cfg.experts),
        experts_per_token=cfg.experts_per_token,
        intermediate_size=intermediate,
        shared_intermediate_size=(
            shared.tensors[_mlp_name(shared, 0, "gate")].shape[0] if shared else None
        ),
        attention_bias=any(n.endswith("q_proj.bias") for n in base.tensors),
    )
    pieces = plan_pieces(meta_parameters(out_config), set(base.tensors), len(cfg.experts))
    warnings = []
    count = len(cfg.experts)
    if count & (count - 1):
        warnings.append(
            f"{count} experts is not a power of two; llama.cpp and some kernels expect 2, 4, 8, ..."
        )
    return MoEPlan(
        architecture=arch.name,
        config=out_config,
        pieces=pieces,
        dtype=getattr(torch, _output_dtype(cfg, base)),
        base_type=base_type,
        layers=layers,
        hidden=hidden,
        gate_mode=cfg.gate_mode,
        experts=[c.label for c in inputs.experts],
        shared_expert=shared.label if shared else None,
        merged_trunk=cfg.base_merge is not None,
        warnings=warnings,
    )


def _gates(
    plan: MoEPlan, cfg: MoEConfig, inputs: _Inputs, seed: int, device: torch.device
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
    inputs: _Inputs,
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


def _open_inputs(cfg: MoEConfig, stack: ExitStack) -> _Inputs:
    """Open every model once (an expert may be the base itself); no tensor is read."""
    opened: dict[str, Checkpoint] = {}

    def open_one(ref: ModelRef, where: str) -> Checkpoint:
        if ref.lora:
            raise CheckpointError(f"{where}: '{ref}' has a LoRA; merge it into the model first")
        key = str(ref)
        if key not in opened:
            checkpoint = open_checkpoint(resolve_model(ref.path, ref.revision), key)
            stack.enter_context(checkpoint)
            if checkpoint.config is None or "model_type" not in checkpoint.config:
                raise CheckpointError(
                    f"{where}: '{ref}' has no config.json with a model_type; MoE building needs "
                    "Hugging Face model folders"
                )
            opened[key] = checkpoint
        return opened[key]

    base = open_one(cfg.base_model, "base_model")
    experts = [
        open_one(e.source_model, f"experts[{i}].source_model") for i, e in enumerate(cfg.experts)
    ]
    shared = [
        open_one(e.source_model, f"shared_experts[{i}].source_model")
        for i, e in enumerate(cfg.shared_experts or [])
    ]
    return _Inputs(base, experts, shared[0] if shared else None)


def _mlp_name(checkpoint: Checkpoint, layer: int, role: str) -> str:
    """The dense MLP projection ``role`` of ``layer`` (``model.layers.L.mlp.gate_proj.weight``)."""
    name = f"model.layers.{layer}.{DENSE_MLP.format(role=role)}"
    if name not in checkpoint.tensors:
        raise IncompatibleModels(
            f"model '{checkpoint.label}' has no tensor '{name}'; experts must be Llama-style "
            "decoders with a gated MLP (gate_proj, up_proj, down_proj)"
        )
    return name


def _check_experts(inputs: _Inputs) -> None:
    """Every expert must be the base's architecture and size (a shared expert may differ in
    its MLP width)."""
    base = inputs.base
    base_type = (base.config or {}).get("model_type")
    layers, _ = layer_count(base.config, base.tensors)
    for role in ROLES:
        _mlp_name(base, 0, role)
    candidates = [(e, False) for e in inputs.experts]
    if inputs.shared is not None:
        candidates.append((inputs.shared, True))
    for expert, shared in candidates:
        if expert is base:
            continue
        expert_type = (expert.config or {}).get("model_type")
        if expert_type != base_type:
            raise IncompatibleModels(
                f"expert '{expert.label}' is a '{expert_type}' model and the base "
                f"'{base.label}' a '{base_type}' one; every expert must share the base's architecture"
            )
        for name, info in base.tensors.items():
            other = expert.tensors.get(name)
            if shared and ".mlp." in name and other is not None:
                continue
            if other is None or other.shape != info.shape:
                found = "missing" if other is None else f"shape {other.shape}"
                raise IncompatibleModels(
                    f"expert '{expert.label}' does not match the base '{base.label}' at tensor "
                    f"'{name}' ({found}, base {info.shape}); experts must be fine-tunes of the base "
                    "(same architecture and size)"
                )
        for layer in range(layers):
            for role in ROLES:
                _mlp_name(expert, layer, role)


def _output_dtype(cfg: MoEConfig, base: Checkpoint) -> str:
    """The config's ``dtype``, else the base's (its config, else its embedding's)."""
    if cfg.dtype is not None:
        return normalize_dtype(cfg.dtype) or cfg.dtype
    config = base.config or {}
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and normalize_dtype(value):
            return normalize_dtype(value) or value
    first = next(iter(base.tensors.values()))
    return str(SAFETENSORS_DTYPES[first.dtype]).removeprefix("torch.")


def _make(
    piece: Piece,
    inputs: _Inputs,
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
    piece: Piece, inputs: _Inputs, cfg: MoEConfig, dtype: torch.dtype, seed: int
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
