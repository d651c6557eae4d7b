"""Merging LoRA adapters of one base into one adapter, on the weight updates themselves.

Averaging the factors (``Ā = mean A_i``, ``B̄ = mean B_i``) is not a merge of the updates:
``B̄ Ā = (1/k²) Σ_i Σ_j B_i A_j`` carries cross-terms ``B_i A_j`` that no adapter learned. Two
correct ways are offered instead:

- ``cat``: stack the factors, ``B = [w_1 s_1 B_1, …, w_k s_k B_k]``, ``A = [A_1; …; A_k]``, so
  ``B A = Σ_i w_i s_i B_i A_i`` exactly; the rank is the sum of the ranks.
- any alloykit method (``task_arithmetic``, ``ties``, ``dare_ties``, ...) on the dense models
  ``W + s_i B_i A_i``, exactly as ``alloykit merge`` would merge them (same YAML, parameters,
  gradients and filters), restricted to the tensors the adapters touch and run in float64;
  the merged update ``ΔW = W_merged − W`` is re-factorised by truncated SVD to the target
  rank (Eckart–Young optimal; see :mod:`alloykit.lora.factorize`) and its relative error
  reported per module.

Tensors the adapters store whole (``modules_to_save``, biases) are merged like any weight and
stored whole in the output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from alloykit.config import (
    MergeConfig,
    ModelRef,
    load_config,
    parse_model_string,
    read_documents,
    yaml_path,
)
from alloykit.errors import ConfigError
from alloykit.io.checkpoint import Checkpoint, open_checkpoint
from alloykit.io.hub import resolve_model
from alloykit.io.writer import OutputFolder, check_output_folder
from alloykit.lora.adapter import Adapter, LoraModule, check_fits, save_adapter, weight_name
from alloykit.lora.checkpoint import resolve_adapter
from alloykit.lora.extract import ModuleReport
from alloykit.lora.factorize import SvdOptions, factors, relative_error, spectrum

log = logging.getLogger("alloykit")
REPORT_FILE = "alloykit_lora_merge.json"
RECIPE_FILE = "alloykit_lora_merge.yml"


@dataclass(frozen=True)
class LoraMergeOptions:
    """Options of :func:`merge_adapters` (the flags of ``alloykit lora merge``).

    Args:
        rank: target rank of the merged adapter (overrides the config's ``rank``; default: the
            sum of the input ranks of each module, which is exact for linear methods).
        device: where the merge arithmetic runs (``cpu``, ``cuda``, ``auto``).
        seed: seed for methods that sample (DARE, DELLA).
        svd: settings of the re-factorisation SVD.
        overwrite: replace an existing non-empty output folder.
    """

    rank: int | None = None
    device: str = "cpu"
    seed: int | None = None
    svd: SvdOptions = field(default_factory=lambda: SvdOptions(precision="float64"))
    overwrite: bool = False


@dataclass
class LoraMergeResult:
    """What :func:`merge_adapters` wrote; ``modules`` holds the re-factorisation errors."""

    output: Path
    method: str
    modules: list[ModuleReport]
    saved: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Recipe:
    method: str | dict[str, Any]
    base: ModelRef | None
    adapters: list[tuple[ModelRef, Mapping[str, Any]]]  # adapter (path, revision), parameters
    rest: dict[str, Any]  # the remaining top-level keys (parameters, dtype, ...)
    rank: int | None


def merge_adapters(
    config: str | Path | Mapping[str, Any], out: str | Path, options: LoraMergeOptions | None = None
) -> LoraMergeResult:
    """Merge the LoRA adapters a YAML recipe names into one adapter at ``out``.

    The recipe is MergeKit's ``models:`` form whose models are adapters of ``base_model``
    (default: the adapters' ``base_model_name_or_path``), plus ``rank``; ``merge_method`` is
    ``cat`` or any alloykit method. The output folder (``adapter_config.json``,
    ``adapter_model.safetensors``, the recipe and ``alloykit_lora_merge.json`` with the
    per-module errors) appears only when complete.

    Example:
        >>> merge_adapters("adapters.yml", "merged-adapter/")  # doctest: +SKIP
    """
    options = options or LoraMergeOptions()
    out = Path(out)
    check_output_folder(out, overwrite=options.overwrite)
    data = _read(config)
    parsed = _parse(data, options)
    if parsed.method != "cat":  # the whole recipe is checked before any adapter is read
        _dense_config(parsed, parsed.base or ModelRef(path="base_model"))
    adapters = [resolve_adapter(ref.path, ref.revision) for ref, _ in parsed.adapters]
    recipe = _with_base(parsed, adapters)
    base_ref = recipe.base
    assert base_ref is not None
    with open_checkpoint(resolve_model(base_ref.path, base_ref.revision), str(base_ref)) as base:
        shapes = {name: info.shape for name, info in base.tensors.items()}
        for adapter in adapters:
            check_fits(adapter, shapes, base.label)
        if recipe.method == "cat":
            merged, reports = _cat(recipe, adapters, base)
        else:
            merged, reports = _dense_merge(recipe, adapters, base, options)
    merged.base_model = _portable(base_ref)
    text = json.dumps({"method": recipe.method, "modules": [asdict(r) for r in reports]}, indent=2)
    recipe_text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    with OutputFolder(out, overwrite=options.overwrite) as folder:
        save_adapter(merged, folder.path, {REPORT_FILE: text + "\n", RECIPE_FILE: recipe_text})
        folder.commit()
    name = recipe.method if isinstance(recipe.method, str) else "composed"
    return LoraMergeResult(out, name, reports, sorted(merged.full))


def _read(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    documents = read_documents(config)
    if len(documents) != 1:
        raise ConfigError(f"'{config}': an adapter merge is one YAML document")
    return documents[0]


def _parse(data: Mapping[str, Any], options: LoraMergeOptions) -> _Recipe:
    """Split the recipe into method, base, adapters and the rest; problems all at once."""
    rest = dict(data)
    problems = []
    method = rest.pop("merge_method", None)
    if not isinstance(method, str | dict):
        problems.append("merge_method: give cat or a method name (alloykit methods lists them)")
    rank = rest.pop("rank", None)
    if options.rank is not None:  # --rank overrides the recipe
        rank = options.rank
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        problems.append(f"rank: {rank!r} is not a positive integer")
    for key in ("slices", "modules"):
        if key in rest:
            problems.append(f"{key}: an adapter merge takes 'models' (a list of adapters)")
    models = rest.pop("models", None)
    adapters: list[tuple[ModelRef, Mapping[str, Any]]] = []
    if not isinstance(models, list) or not models:
        problems.append("models: list the adapters to merge")
    for i, entry in enumerate(models or []):
        where = yaml_path("models", i, "model")
        reference = entry.get("model") if isinstance(entry, dict) else entry
        try:
            parts = parse_model_string(str(reference))
            if parts.get("lora"):
                raise ValueError(f"'{reference}' names base+adapter; give the adapter alone")
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        parameters = entry.get("parameters", {}) if isinstance(entry, dict) else {}
        adapters.append((ModelRef(path=str(parts["path"]), revision=parts["revision"]), parameters))
    base = rest.pop("base_model", None)
    base_ref = None
    try:
        base_ref = ModelRef.model_validate(base) if base is not None else None
    except ValueError as e:
        problems.append(f"base_model: {' '.join(str(e).split())}")
    if base_ref is not None and base_ref.lora:
        problems.append(f"base_model: '{base_ref}' names an adapter; give the base model alone")
    if method == "cat":
        problems += _cat_problems(rest, adapters, rank)
    if problems:
        raise ConfigError(problems)
    assert isinstance(method, str | dict)
    return _Recipe(method, base_ref, adapters, rest, rank)


def _cat_problems(
    rest: Mapping[str, Any], adapters: list[tuple[ModelRef, Mapping[str, Any]]], rank: int | None
) -> list[str]:
    problems = []
    if rank is not None:
        problems.append(
            "rank: cat is exact and its rank is the sum of the adapters' ranks; remove rank, "
            "or use task_arithmetic to re-factorise to a rank"
        )
    for key in rest:
        problems.append(f"{key}: not used by cat (it takes only models[*].parameters.weight)")
    for i, (_, parameters) in enumerate(adapters):
        for key, value in parameters.items():
            where = yaml_path("models", i, "parameters", key)
            if key != "weight":
                problems.append(f"{where}: cat takes only a weight per adapter")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"{where}: cat takes one number per adapter, not {value!r}")
    return problems


def _with_base(recipe: _Recipe, adapters: list[Adapter]) -> _Recipe:
    """The recipe with its base: ``base_model``, else the adapters' common base."""
    if recipe.base is not None:
        return recipe
    named = {a.base_model for a in adapters}
    if len(named) != 1 or None in named:
        listing = ", ".join(f"'{a.label}': {a.base_model}" for a in adapters)
        raise ConfigError(
            f"base_model: the adapters do not name one base ({listing}); set base_model"
        )
    (base,) = named
    assert base is not None
    return replace(recipe, base=ModelRef.model_validate(base))


def _portable(ref: ModelRef) -> str:
    local = Path(ref.path).expanduser()
    return str(local.resolve()) if local.exists() else str(ref)


# --------------------------------------------------------------------------- cat


def _cat(
    recipe: _Recipe, adapters: list[Adapter], base: Checkpoint
) -> tuple[Adapter, list[ModuleReport]]:
    """Stack the weighted, scaled factors: ``B A = Σ_i w_i s_i B_i A_i`` exactly."""
    weights = [float(parameters.get("weight", 1.0)) for _, parameters in recipe.adapters]
    modules: dict[str, LoraModule] = {}
    reports = []
    for module in sorted({m for a in adapters for m in a.modules}):
        parts = [
            (w, a, a.modules[module])
            for w, a in zip(weights, adapters, strict=True)
            if module in a.modules
        ]
        _check_kinds(module, [(a, lora) for _, a, lora in parts])
        dtype = parts[0][2].A.dtype
        b = torch.cat([lora.B.double() * (w * lora.scale(a.rslora)) for w, a, lora in parts], 1)
        a_stack = torch.cat([lora.A.double() for _, _, lora in parts], 0)
        rank = a_stack.shape[0]
        modules[module] = LoraModule(a_stack.to(dtype), b.to(dtype), float(rank), parts[0][2].kind)
        shape = (b.shape[0], a_stack.shape[1])
        reports.append(ModuleReport(module, shape, rank, min(shape), 0.0, "exact"))
    full = {}
    for name in sorted({n for a in adapters for n in a.full}):
        stored = base.read(name)
        value = stored.double()
        for w, adapter in zip(weights, adapters, strict=True):
            if name in adapter.full:
                value += w * (adapter.full[name].double() - stored.double())
        if not torch.equal(value.to(stored.dtype), stored):  # e.g. PEFT's copies of the base
            full[name] = value.to(stored.dtype)
    return Adapter(modules, full, rslora=False), reports


def _check_kinds(module: str, parts: list[tuple[Adapter, LoraModule]]) -> None:
    kinds = {lora.kind for _, lora in parts}
    if len(kinds) > 1:
        listing = ", ".join(f"'{a.label}': {lora.kind}" for a, lora in parts)
        raise ConfigError(f"module '{module}' is adapted as different module types ({listing})")


# --------------------------------------------------------------------------- dense methods


def _dense_merge(
    recipe: _Recipe, adapters: list[Adapter], base: Checkpoint, options: LoraMergeOptions
) -> tuple[Adapter, list[ModuleReport]]:
    """Merge ``W + ΔW_i`` with the recipe's method; re-factorise ``W_merged − W``.

    Each merged tensor is re-factorised as soon as it is produced, so memory holds one
    tensor (in float64) at a time, plus the factors made so far.
    """
    from alloykit.execute import ExecutionOptions, execute
    from alloykit.pipeline import open_models
    from alloykit.plan import build_plan

    assert recipe.base is not None
    dense = _dense_config(recipe, recipe.base)
    sink = _Refactorise(recipe, adapters, base, options.svd)
    with open_models(dense, dtype=torch.float64) as checkpoints:
        plan = build_plan(dense, checkpoints)
        jobs = [replace(job, dtype="F64") for job in plan.jobs if job.output in sink.wanted]
        execution = ExecutionOptions(options.device, "float64", options.seed)
        execute(replace(plan, jobs=jobs), checkpoints, sink, execution)
    ordered = sorted(sink.reports, key=lambda r: r.module)
    return Adapter(dict(sorted(sink.modules.items())), sink.full, rslora=False), ordered


class _Refactorise:
    """A merge sink that turns each merged adapted weight into LoRA factors as it arrives."""

    def __init__(
        self, recipe: _Recipe, adapters: list[Adapter], base: Checkpoint, svd: SvdOptions
    ) -> None:
        self.recipe, self.adapters, self.base, self.svd = recipe, adapters, base, svd
        self.by_weight = {weight_name(m): m for a in adapters for m in a.modules}
        self.wanted = set(self.by_weight) | {name for a in adapters for name in a.full}
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, torch.Tensor] = {}
        self.reports: list[ModuleReport] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        module = self.by_weight.get(name)
        if module is None:  # a tensor the adapters store whole
            dtype = next(a.full[name].dtype for a in self.adapters if name in a.full)
            self.full[name] = tensor.to(dtype)
            return
        parts = [(a, a.modules[module]) for a in self.adapters if module in a.modules]
        _check_kinds(module, parts)
        kind, dtype = parts[0][1].kind, parts[0][1].A.dtype
        delta = tensor.double() - self.base.read(name).double()
        if not bool(delta.any()):  # e.g. every entry trimmed or cancelled
            return
        matrix = delta if kind == "linear" else delta.T  # (out, in) = B A
        full_rank = min(matrix.shape)
        rank = min(self.recipe.rank or sum(lora.rank for _, lora in parts), full_rank)
        found = spectrum(matrix, rank, module, self.svd)
        b, a = (f.to(dtype).contiguous() for f in factors(found, rank))
        self.modules[module] = LoraModule(a, b, float(rank), kind)
        error = relative_error(matrix, b, a)
        shape = tuple(matrix.shape)
        self.reports.append(ModuleReport(module, shape, rank, full_rank, error, found.kind))


def _dense_config(recipe: _Recipe, base: ModelRef) -> MergeConfig:
    """The ``alloykit merge`` recipe of the dense models ``base+adapter``, validated."""
    from alloykit.methods import resolve_method

    models = []
    for ref, parameters in recipe.adapters:
        dense_ref = ModelRef(
            path=base.path, revision=base.revision, lora=ref.path, lora_revision=ref.revision
        )
        models.append({"model": str(dense_ref), "parameters": dict(parameters)})
    data = {**recipe.rest, "merge_method": recipe.method, "models": models}
    if resolve_method(recipe.method).base != "input":  # linear-like methods: no base input
        data["base_model"] = str(base)
    return load_config(data)
