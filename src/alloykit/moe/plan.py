"""Planning an MoE build: open and check the models, choose the output architecture and read
its tensor layout, without reading any tensor (``alloykit moe --dry-run`` prints the plan)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloykit.architecture import layer_count
from alloykit.config import ModelRef, normalize_dtype
from alloykit.errors import CheckpointError, IncompatibleModels
from alloykit.io.checkpoint import SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
from alloykit.io.hub import resolve_model
from alloykit.moe.config import MoEConfig, load_moe_config
from alloykit.moe.layout import (
    DENSE_MLP,
    ROLES,
    Piece,
    choose_architecture,
    meta_parameters,
    output_config,
    plan_pieces,
)


@dataclass
class Inputs:
    """The opened models of a build (an expert may be the base itself)."""

    base: Checkpoint
    experts: list[Checkpoint]  # routed experts, in config order
    shared: Checkpoint | None


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
        return plan_inputs(cfg, open_inputs(cfg, stack))


def plan_inputs(cfg: MoEConfig, inputs: Inputs) -> MoEPlan:
    """Check the models, choose the architecture and read its layout."""
    base = inputs.base
    base_config = base.config or {}
    _check_experts(inputs)
    base_type = str(base_config.get("model_type"))
    shared_specs = list(cfg.shared_experts or [])
    arch = choose_architecture(cfg.architecture, base_type, len(shared_specs))
    layers, _ = layer_count(base_config, base.tensors)
    intermediate, hidden = base.tensors[mlp_name(base, 0, "gate")].shape
    shared = inputs.shared
    out_config = output_config(
        arch,
        base_config,
        experts=len(cfg.experts),
        experts_per_token=cfg.experts_per_token,
        intermediate_size=intermediate,
        shared_intermediate_size=(
            shared.tensors[mlp_name(shared, 0, "gate")].shape[0] if shared else None
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


def open_inputs(cfg: MoEConfig, stack: ExitStack) -> Inputs:
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
    return Inputs(base, experts, shared[0] if shared else None)


def mlp_name(checkpoint: Checkpoint, layer: int, role: str) -> str:
    """The dense MLP projection ``role`` of ``layer`` (``model.layers.L.mlp.gate_proj.weight``)."""
    name = f"model.layers.{layer}.{DENSE_MLP.format(role=role)}"
    if name not in checkpoint.tensors:
        raise IncompatibleModels(
            f"model '{checkpoint.label}' has no tensor '{name}'; experts must be Llama-style "
            "decoders with a gated MLP (gate_proj, up_proj, down_proj)"
        )
    return name


def _check_experts(inputs: Inputs) -> None:
    """Every expert must be the base's architecture and size (a shared expert may differ in
    its MLP width)."""
    base = inputs.base
    base_type = (base.config or {}).get("model_type")
    layers, _ = layer_count(base.config, base.tensors)
    for role in ROLES:
        mlp_name(base, 0, role)
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
                mlp_name(expert, layer, role)


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
