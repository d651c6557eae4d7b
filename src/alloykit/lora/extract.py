"""LoRA extraction: a PEFT adapter that turns a base model into (an approximation of) a fine-tune.

For every adapted module the update ``ΔW = W_finetune − W_base`` is factorised by truncated
SVD, ``ΔW ≈ B A`` (see :mod:`alloykit.lora.factorize`), with ``lora_alpha = r`` so PEFT's
scale is 1. Which tensors become what:

- 2-D weights of Linear and Conv1D modules (all, or those named by ``modules``): LoRA factors;
- embeddings and the LM head: LoRA factors when asked (``embeddings``/``head``), otherwise
  saved whole in ``modules_to_save`` when they changed (as MergeKit's extractor does);
- everything else that changed (norms, biases, other parameters): saved whole, biases of
  adapted modules through ``bias: lora_only``, the rest in ``modules_to_save``;
- changed weights of Linear modules left out by ``modules``: not saved, said in one warning.

Module types come from the architecture itself (built on the meta device from ``config.json``,
no weights), so a GPT-2 Conv1D (stored in × out) is told from a square Linear.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.architecture import HEAD_NAMES
from alloykit.errors import AlloyError, IncompatibleModels, did_you_mean
from alloykit.io.checkpoint import FLOAT_CODES, Checkpoint, open_checkpoint
from alloykit.io.hub import resolve_model
from alloykit.io.writer import OutputFolder
from alloykit.lora.adapter import Adapter, LoraModule, ModuleKind, save_adapter
from alloykit.lora.factorize import (
    SvdKind,
    SvdOptions,
    check_rank,
    energy_rank,
    factors,
    relative_error,
    spectrum,
)

log = logging.getLogger("alloykit")
REPORT_FILE = "alloykit_extract.json"
_EMBEDDING_WORDS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")


@dataclass(frozen=True)
class ExtractOptions:
    """Options of :func:`extract_lora` (the flags of ``alloykit lora extract``).

    Args:
        rank: the rank of every module (clamped to a module's full rank); with ``energy``, the
            largest rank.
        energy: choose each module's rank as the fewest singular values holding this fraction
            of ``‖ΔW‖_F²`` (0 < energy <= 1).
        modules: leaf or full module names to adapt (``q_proj``, ``model.layers.0.mlp``);
            None adapts every Linear/Conv1D module.
        embeddings: adapt the input embeddings with LoRA too (else saved whole if changed).
        head: adapt the LM head with LoRA too (else saved whole if changed).
        svd: exact/randomized SVD settings.
        overwrite: replace an existing non-empty output folder.
    """

    rank: int | None = None
    energy: float | None = None
    modules: tuple[str, ...] | None = None
    embeddings: bool = False
    head: bool = False
    svd: SvdOptions = field(default_factory=SvdOptions)
    overwrite: bool = False


@dataclass(frozen=True)
class ModuleReport:
    """How well one module's update was captured."""

    module: str
    shape: tuple[int, ...]  # the update's (out, in)
    rank: int
    full_rank: int
    relative_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F, with the factors as saved
    svd: SvdKind


@dataclass
class ExtractResult:
    """What :func:`extract_lora` wrote."""

    output: Path
    modules: list[ModuleReport]
    saved: list[str]  # tensors saved whole (modules_to_save and biases)
    skipped: list[str]  # changed tensors left out (modules not selected)
    warnings: list[str]


def extract_lora(
    base: str | Path, model: str | Path, out: str | Path, options: ExtractOptions
) -> ExtractResult:
    """Extract a PEFT LoRA adapter of ``model`` (a fine-tune) relative to ``base`` into ``out``.

    ``base`` and ``model`` are model folders or Hub repo ids (``name@revision``). The output
    folder holds ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``alloykit_extract.json`` (per-module rank and relative error); it appears only when
    complete.

    Example:
        >>> extract_lora("base/", "finetune/", "adapter/", ExtractOptions(rank=16))  # doctest: +SKIP
    """
    check_rank(options.rank, options.energy)
    out = Path(out)
    with (
        _open(str(base)) as base_ckpt,
        _open(str(model)) as model_ckpt,
        OutputFolder(out, overwrite=options.overwrite) as folder,
    ):
        adapter, result = _extract(base_ckpt, model_ckpt, module_kinds(base_ckpt), options, out)
        report = {"modules": [asdict(r) for r in result.modules], "saved": result.saved}
        adapter.base_model = _portable(str(base))
        save_adapter(adapter, folder.path, {REPORT_FILE: json.dumps(report, indent=2) + "\n"})
        folder.commit()
    for warning in result.warnings:
        log.warning(warning)
    return result


def _open(reference: str) -> Checkpoint:
    """Open a model folder, file or ``repo_id[@revision]``."""
    name, revision = reference, None
    if not Path(reference).exists() and "@" in reference:
        name, revision = reference.split("@", 1)
    return open_checkpoint(resolve_model(name, revision), reference)


def _portable(reference: str) -> str:
    local = Path(reference).expanduser()
    return str(local.resolve()) if local.exists() else reference


def _extract(
    base: Checkpoint,
    model: Checkpoint,
    kinds: dict[str, ModuleKind | None],
    options: ExtractOptions,
    out: Path,
) -> tuple[Adapter, ExtractResult]:
    _check_module_names(options.modules, base)
    loras: dict[str, LoraModule] = {}
    full: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    skipped: list[str] = []
    clamped: list[str] = []
    for name, info in model.tensors.items():
        base_info = base.tensors.get(name)
        if base_info is None or base_info.shape != info.shape:
            has = "does not have it" if base_info is None else f"has {base_info.shape}"
            raise IncompatibleModels(
                f"model '{model.label}' has tensor '{name}' {info.shape} and base "
                f"'{base.label}' {has}: extract from a fine-tune of this base"
            )
        if info.dtype not in FLOAT_CODES:
            continue
        tuned = model.read(name)
        delta = tuned.double() - base.read(name).double()
        if not bool(delta.any()):
            continue
        module, _, param = name.rpartition(".")
        kind = kinds.get(module, _guess_kind(name, delta))
        target = _target(module, param, delta.ndim, kind, options)
        if target == "lora" and kind is not None:
            matrix = delta if kind == "linear" else delta.T  # ΔW = B A as (out, in)
            loras[module], report = _factorise(module, matrix, kind, tuned.dtype, options, clamped)
            reports.append(report)
        elif target == "full":
            full[name] = tuned
        else:
            skipped.append(name)
    warnings = []
    if clamped:
        warnings.append(
            f"rank {options.rank} is above the full rank of {len(clamped)} modules (e.g. "
            f"{clamped[0]}); they use their full rank"
        )
    if skipped:
        warnings.append(
            f"{len(skipped)} changed tensors of modules not selected by --modules are left out "
            f"(e.g. {skipped[0]})"
        )
    adapter = Adapter(loras, full, rslora=False, label=str(out))
    return adapter, ExtractResult(out, reports, sorted(full), skipped, warnings)


def _check_module_names(names: tuple[str, ...] | None, base: Checkpoint) -> None:
    """Every ``--modules`` name must match a 2-D weight of the base (leaf or full name)."""
    modules = [n.removesuffix(".weight") for n, i in base.tensors.items() if len(i.shape) == 2]
    for name in names or ():
        if not any(name == m or m.endswith("." + name) for m in modules):
            leaves = sorted({m.rpartition(".")[2] for m in modules})
            raise AlloyError(
                f"--modules: '{name}' matches no weight of base '{base.label}'"
                f"{did_you_mean(name, leaves)}; its modules are {', '.join(leaves)}"
            )


def _target(
    module: str, param: str, ndim: int, kind: ModuleKind | None, options: ExtractOptions
) -> str:
    """``lora``, ``full`` or ``skip`` for a changed tensor ``<module>.<param>``."""
    if param != "weight" or ndim != 2 or kind is None:
        return "full"
    if kind == "embedding":
        return "lora" if options.embeddings else "full"
    if f"{module}.weight" in HEAD_NAMES:
        return "lora" if options.head else "full"
    if options.modules is None:
        return "lora"
    leaf = module.rpartition(".")[2]
    chosen = any(m in (leaf, module) or module.endswith("." + m) for m in options.modules)
    return "lora" if chosen else "skip"


def _factorise(
    module: str,
    matrix: torch.Tensor,
    kind: ModuleKind,
    dtype: torch.dtype,
    options: ExtractOptions,
    clamped: list[str],
) -> tuple[LoraModule, ModuleReport]:
    full_rank = min(matrix.shape)
    cap = full_rank if options.rank is None else options.rank
    if cap > full_rank:
        clamped.append(f"{module}: {full_rank}")
        cap = full_rank
    found = spectrum(matrix, cap, module, options.svd)
    rank = cap
    if options.energy is not None:
        rank = max(1, min(cap, energy_rank(found.S, found.total_energy, options.energy)))
    b, a = factors(found, rank)
    b, a = b.to(dtype), a.to(dtype)
    error = relative_error(matrix, b, a)
    report = ModuleReport(module, tuple(matrix.shape), rank, full_rank, error, found.kind)
    return LoraModule(a.contiguous(), b.contiguous(), float(rank), kind), report


def _guess_kind(name: str, delta: torch.Tensor) -> ModuleKind | None:
    """A module's kind from its tensor name, for architectures transformers cannot build."""
    if delta.ndim != 2 or not name.endswith(".weight"):
        return None
    return "embedding" if any(w in name for w in _EMBEDDING_WORDS) else "linear"


def module_kinds(checkpoint: Checkpoint) -> dict[str, ModuleKind | None]:
    """Module name -> ``linear``, ``conv1d``, ``embedding`` or None (any other module), from the
    architecture built on the meta device; empty when transformers cannot build it."""
    config = checkpoint.config
    if not config or not config.get("architectures"):
        return {}
    try:
        import transformers

        hf_config = transformers.AutoConfig.for_model(**config)
        model_class: Any = getattr(transformers, config["architectures"][0], None)
        with torch.device("meta"):
            if model_class is None:
                model = transformers.AutoModel.from_config(hf_config)
            else:
                model = model_class(hf_config)
    except Exception as e:  # custom or unknown architecture: fall back to tensor names
        log.debug(f"cannot build {config['architectures'][0]} on the meta device: {e}")
        return {}
    kinds: dict[str, ModuleKind | None] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(layer, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif type(layer).__name__ == "Conv1D":
            kinds[name] = "conv1d"
        else:
            kinds[name] = None
    return kinds


def rank_summary(reports: list[ModuleReport]) -> str:
    """One line: modules, ranks and the worst and mean relative errors."""
    if not reports:
        return "no module changed"
    errors = [r.relative_error for r in reports]
    ranks = sorted({r.rank for r in reports})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    mean = math.fsum(errors) / len(errors)
    return (
        f"{len(reports)} modules at rank {rank_text}; relative error mean {mean:.3g}, "
        f"max {max(errors):.3g}"
    )
