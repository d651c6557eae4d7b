"""PEFT LoRA adapters: reading, the dense update ``scale·B·A`` of a module, writing.

A LoRA adapter (Hu et al. 2021, arXiv:2106.09685) changes a weight ``W`` (out × in) by
``ΔW = scale · B A`` with ``A`` (r × in), ``B`` (out × r) and ``scale = alpha / r``, or
``alpha / √r`` with rank-stabilised LoRA (Kalajdzievski 2023, arXiv:2312.03732). Per-module
ranks and alphas come from ``rank_pattern`` / ``alpha_pattern`` (module-name patterns, the
first whose ``(.*\\.)?PATTERN$`` matches wins).

PEFT's file layout (checked against peft 0.21, see tests/lora/test_adapter.py):
``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``), keys under
``base_model.model.``:

- ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` for Linear and Conv1D modules;
  Conv1D stores its weight as (in × out) (``fan_in_fan_out``), so ``ΔW`` is transposed;
- ``<module>.lora_embedding_A`` (r × vocab) / ``<module>.lora_embedding_B`` (dim × r) for
  embeddings, whose weight (vocab × dim) changes by ``(scale·B A)ᵀ``;
- ``<module>.base_layer.bias`` (``bias: lora_only``) and ``<module>.<param>`` of
  ``modules_to_save`` modules: whole tensors that replace the base's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alloykit.errors import CheckpointError, IncompatibleModels
from alloykit.io.checkpoint import read_json_object

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ModuleKind = Literal["linear", "conv1d", "embedding"]
# adapter_config keys that change what the weights mean and that alloykit does not implement
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


@dataclass
class LoraModule:
    """One adapted module: ``ΔW = scale · B A`` (oriented as the stored weight, see ``kind``)."""

    A: torch.Tensor  # (r, in); embeddings: (r, vocab)
    B: torch.Tensor  # (out, r); embeddings: (dim, r)
    alpha: float
    kind: ModuleKind = "linear"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def scale(self, rslora: bool) -> float:
        """``alpha / r``, or ``alpha / √r`` for rank-stabilised LoRA."""
        return self.alpha / (math.sqrt(self.rank) if rslora else self.rank)


@dataclass
class Adapter:
    """A LoRA adapter in memory: factors per module and whole tensors that replace the base's.

    ``modules`` is keyed by module name (``model.layers.0.self_attn.q_proj``); ``full`` by
    tensor name (``model.norm.weight``, ``model.layers.0.self_attn.q_proj.bias``).
    """

    modules: dict[str, LoraModule]
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    rslora: bool = False
    base_model: str | None = None  # base_model_name_or_path
    label: str = "adapter"

    def update(self, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``scale · B A`` of ``module`` (in ``dtype``), shaped like the module's stored weight."""
        lora = self.modules[module]
        dense = lora.B.to(dtype) @ lora.A.to(dtype) * lora.scale(self.rslora)
        return dense.T if lora.kind in ("conv1d", "embedding") else dense


def weight_name(module: str) -> str:
    """The tensor an adapted module changes: ``<module>.weight``."""
    return f"{module}.weight"


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern rule: the first key ``k`` with ``(.*\\.)?k$`` matching ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# --------------------------------------------------------------------------- reading


def read_adapter(folder: str | Path, label: str | None = None) -> Adapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + weights).

    Raises CheckpointError naming the folder for a missing config or weights, another adapter
    type (IA3, LoHa, ...), DoRA or other variants, and ranks that disagree with the config.
    """
    folder = Path(folder)
    label = label or str(folder)
    config = read_adapter_config(folder, label)
    tensors = _read_weights(folder, label)
    rslora = bool(config.get("use_rslora", False))
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    conv = bool(config.get("fan_in_fan_out", False))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        if "lora_magnitude_vector" in name:
            raise CheckpointError(
                f"adapter '{label}' is a DoRA adapter; only plain LoRA is supported"
            )
        match = re.match(
            r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$", name
        )
        if match is not None:
            factors.setdefault(match[1], {})[match[2]] = tensor
        elif ".lora_" in name:
            raise CheckpointError(f"adapter '{label}': unsupported tensor '{key}' (a LoRA variant)")
        else:
            full[name.replace(".base_layer.", ".")] = tensor
    modules = {}
    for module, parts in sorted(factors.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        )
        if a_key not in parts or b_key not in parts:
            missing = b_key if a_key in parts else a_key
            raise CheckpointError(f"adapter '{label}': module '{module}' has no {missing} tensor")
        A, B = parts[a_key], parts[b_key]
        rank = int(pattern_value(rank_pattern, module, r))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] != rank:
            raise CheckpointError(
                f"adapter '{label}': module '{module}' has inconsistent ranks (A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}, config rank {rank}); the adapter is damaged or its "
                "adapter_config.json (r, rank_pattern) does not belong to these weights"
            )
        kind: ModuleKind = "embedding" if embedding else ("conv1d" if conv else "linear")
        modules[module] = LoraModule(A, B, float(pattern_value(alpha_pattern, module, alpha)), kind)
    if not modules and not full:
        raise CheckpointError(f"adapter '{label}': its weights file holds no LoRA tensors")
    return Adapter(modules, full, rslora, config.get("base_model_name_or_path"), label)


def read_adapter_config(folder: Path, label: str) -> dict[str, Any]:
    """``adapter_config.json`` of ``folder``, checked to be a plain LoRA adapter."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"adapter '{label}': no {CONFIG_FILE} in '{folder}'; a PEFT adapter folder holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} (save it with model.save_pretrained)"
        )
    config = read_json_object(path)
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointError(
            f"adapter '{label}' is a {kind} adapter; only LoRA adapters are supported "
            "(merge it into its base with peft's merge_and_unload first)"
        )
    for key, what in _UNSUPPORTED_FLAGS.items():
        if config.get(key):
            raise CheckpointError(
                f"adapter '{label}' uses {what}, which alloykit does not support; merge it into "
                "its base with peft's merge_and_unload first"
            )
    return config


def _read_weights(folder: Path, label: str) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = folder / WEIGHTS_FILE, folder / "adapter_model.bin"
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file))
        if bin_file.is_file():
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
            if isinstance(state, dict):
                return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    except Exception as e:
        raise CheckpointError(f"adapter '{label}': cannot read its weights ({e})") from e
    raise CheckpointError(
        f"adapter '{label}': no {WEIGHTS_FILE} (or adapter_model.bin) in '{folder}'"
    )


def check_fits(adapter: Adapter, shapes: dict[str, tuple[int, ...]], base_label: str) -> None:
    """Check that every tensor ``adapter`` changes exists in the base with the same shape.

    ``shapes`` maps the base's tensor names to shapes. A module stored transposed by a
    fan_in_fan_out adapter but that is a plain Linear in the base is switched to ``linear``
    (what PEFT does for Linear modules of a fan_in_fan_out config).
    """
    for module, lora in adapter.modules.items():
        name = weight_name(module)
        expected = shapes.get(name)
        if expected is None:
            raise IncompatibleModels(
                f"adapter '{adapter.label}' changes '{name}', which base '{base_label}' does not "
                "have: the adapter was trained on another base model"
            )
        out, inner = lora.B.shape[0], lora.A.shape[1]
        shape = (inner, out) if lora.kind in ("conv1d", "embedding") else (out, inner)
        if lora.kind == "conv1d" and shape != expected and (out, inner) == expected:
            lora.kind, shape = "linear", (out, inner)
        if shape != expected:
            raise IncompatibleModels(
                f"adapter '{adapter.label}': module '{module}' makes a {shape} update for "
                f"'{name}', which is {expected} in base '{base_label}': the adapter was trained "
                "on another base model"
            )
    for name, tensor in adapter.full.items():
        expected = shapes.get(name)
        if expected != tuple(tensor.shape):
            where = "does not have" if expected is None else f"has as {expected}"
            raise IncompatibleModels(
                f"adapter '{adapter.label}' replaces '{name}' {tuple(tensor.shape)}, which base "
                f"'{base_label}' {where}: the adapter was trained on another base model"
            )


# --------------------------------------------------------------------------- writing


def adapter_state(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT weights and ``adapter_config.json`` fields of ``adapter``.

    ``r``/``lora_alpha`` are the most common rank/alpha; modules that differ get
    ``rank_pattern``/``alpha_pattern`` entries under their full names (a full name matches
    only its own module under PEFT's ``(.*\\.)?NAME$`` rule). ``target_modules`` lists full module names, so PEFT adapts exactly
    these modules.
    """
    state: dict[str, torch.Tensor] = {}
    for module, lora in adapter.modules.items():
        if lora.kind == "embedding":
            state[f"{PREFIX}{module}.lora_embedding_A"] = lora.A
            state[f"{PREFIX}{module}.lora_embedding_B"] = lora.B
        else:
            state[f"{PREFIX}{module}.lora_A.weight"] = lora.A
            state[f"{PREFIX}{module}.lora_B.weight"] = lora.B
    saved_modules: set[str] = set()
    lora_biases = False
    for name, tensor in adapter.full.items():
        module, _, param = name.rpartition(".")
        if module in adapter.modules:  # a bias (bias="lora_only") or weight of an adapted module
            state[f"{PREFIX}{module}.base_layer.{param}"] = tensor
            lora_biases = lora_biases or param == "bias"
        else:
            state[f"{PREFIX}{name}"] = tensor
            saved_modules.add(module)
    ranks = [lora.rank for lora in adapter.modules.values()]
    alphas = [lora.alpha for lora in adapter.modules.values()]
    r = max(set(ranks), key=ranks.count) if ranks else 8
    alpha = max(set(alphas), key=alphas.count) if alphas else float(r)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": _number(alpha),
        "use_rslora": adapter.rslora,
        "target_modules": sorted(adapter.modules),
        "rank_pattern": {m: lora.rank for m, lora in adapter.modules.items() if lora.rank != r},
        "alpha_pattern": {
            m: _number(lora.alpha) for m, lora in adapter.modules.items() if lora.alpha != alpha
        },
        "fan_in_fan_out": any(lora.kind == "conv1d" for lora in adapter.modules.values()),
        "modules_to_save": sorted(saved_modules) or None,
        "bias": "lora_only" if lora_biases else "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    return state, config


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def save_adapter(adapter: Adapter, folder: Path, extra_files: dict[str, str] | None = None) -> None:
    """Write ``adapter`` into the existing, empty ``folder`` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    state, config = adapter_state(adapter)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
