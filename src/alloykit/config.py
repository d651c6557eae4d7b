"""The merge config: MergeKit's YAML schema, its validation, and parameter resolution.

Existing MergeKit files work unchanged: ``merge_method``, ``base_model``, ``models`` (with
per-model ``parameters``) or ``slices`` (``sources`` with ``layer_range``), top-level
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` / ``tokenizer``, ``chat_template``.

A parameter value is a scalar, a gradient (a list of numbers interpolated over the layers) or
a list of ``{filter, value}`` entries whose first matching filter wins. :func:`load_config`
checks the whole file before any tensor is read and reports every problem at once, each with
its YAML path (``models[1].parameters.density: 1.4 is outside [0, 1]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alloykit.chat_templates import CHAT_TEMPLATES
from alloykit.errors import AlloyError, ConfigError, did_you_mean

log = logging.getLogger("alloykit")

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}
DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "float": "float32",
    "double": "float64",
}
BUILTIN_CHAT_TEMPLATES = tuple(CHAT_TEMPLATES)
MISSING_ROWS = ("default_row", "holders_only")


class ModelRef(BaseModel):
    """A model: a local folder or a Hugging Face repo id, with an optional revision.

    Written as ``path_or_repo[@revision][+lora_path[@revision]]`` (MergeKit's syntax) or as an
    object ``{model: {path, revision}, lora: ..., override_architecture: ...}``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    revision: str | None = None
    lora: str | None = None
    lora_revision: str | None = None
    override_architecture: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_model_string(value)
        if isinstance(value, dict) and "model" in value:  # MergeKit's object form
            inner = value["model"]
            parsed = dict(parse_model_string(inner) if isinstance(inner, str) else inner)
            lora = value.get("lora")
            if isinstance(lora, dict):
                parsed["lora"], parsed["lora_revision"] = lora.get("path"), lora.get("revision")
            elif isinstance(lora, str):
                parsed["lora"] = lora
            if value.get("override_architecture"):
                parsed["override_architecture"] = value["override_architecture"]
            return parsed
        return value

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        if self.lora:
            text += f"+{self.lora}" + (f"@{self.lora_revision}" if self.lora_revision else "")
        return text


def parse_model_string(text: str) -> dict[str, str | None]:
    """Split ``path[@rev][+lora[@rev]]`` into its parts (ValueError on a malformed string)."""
    parts = text.split("+")
    if len(parts) > 2:
        raise ValueError(f"'{text}' has more than one '+' (model+lora is the only form)")
    fields: dict[str, str | None] = {}
    for key, part in zip(("path", "lora"), parts, strict=False):
        pieces = part.split("@")
        if len(pieces) > 2 or not pieces[0]:
            raise ValueError(f"'{text}' is not path[@revision][+lora[@revision]]")
        fields[key] = pieces[0]
        fields[f"{key}_revision" if key == "lora" else "revision"] = (
            pieces[1] if len(pieces) == 2 else None
        )
    return fields


class InputModel(BaseModel):
    """One entry of ``models:``."""

    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One source of an output slice: a model and a half-open ``layer_range`` [start, end)."""

    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class OutputSlice(BaseModel):
    """One entry of ``slices:``: output layers made from the same layers of every source."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    residual_weight: float | None = None  # in MergeKit's schema, unused there and here


class TokenizerConfig(BaseModel):
    """The ``tokenizer:`` block: the output vocabulary and where its embedding rows come from.

    ``source`` is ``union`` (default), ``base`` or a model; ``tokens`` maps a token to
    ``{source, force}``; ``pad_to_multiple_of`` rounds the row count up; ``missing_rows`` says
    how a token some models lack is merged (``default_row``: they get its default row, as in
    MergeKit; ``holders_only``: it is merged from the models that have it).
    """

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    missing_rows: str = "default_row"


class HeadsConfig(BaseModel):
    """The ``heads:`` block: the model whose task-head tensors (``classifier.*``) are copied."""

    model_config = ConfigDict(extra="forbid")
    source: ModelRef


class ModuleConfig(BaseModel):
    """One entry of ``modules:``: the tensors under ``<name>.``, merged like a whole config.

    Exactly one of ``models`` or ``slices``; ``parameters`` rank between the slice's and the
    top-level ones (MergeKit's precedence).
    """

    model_config = ConfigDict(extra="forbid")
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class CalibrationConfig(BaseModel):
    """The ``calibration:`` block: text the data-aware methods run the models on.

    ``data`` is a local ``.jsonl`` (one JSON object per line, its ``text_key`` field), a ``.txt``
    file (the whole file, one text) or an evaluation task file (``.yml``: each example's prompt
    and right answer). Every text is tokenized, the token streams are
    joined with the end-of-sequence token, and the first ``samples`` blocks of
    ``sequence_length`` tokens are the calibration set, run ``batch_size`` blocks at a time.
    Statistics are cached per model under ``cache_dir`` (default
    ``~/.cache/alloykit/calibration``), keyed by the model's weight files, the data and these
    settings.
    """

    model_config = ConfigDict(extra="forbid")
    data: str
    text_key: str = "text"
    samples: int = Field(default=128, ge=1)
    sequence_length: int = Field(default=512, ge=2)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0  # for the labels Fisher samples from each model's own predictions
    cache_dir: str | None = None


class AimConfig(BaseModel):
    """The ``aim:`` block: activation-informed merging applied after any method.

    ``strength`` is ``1 − ω`` in Nobari et al. 2025: 0 leaves the merge unchanged, 1 keeps the
    base's weights on its most active input channel; the paper's ω = 0.4 is strength 0.6.
    """

    model_config = ConfigDict(extra="forbid")
    strength: float = Field(default=0.6, ge=0.0, le=1.0)


class MergeConfig(BaseModel):
    """A merge recipe, as written in YAML (MergeKit's schema)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str | dict[str, str]
    base_model: ModelRef | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, ModuleConfig] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None
    keep_from_base: list[str] | None = None
    heads: HeadsConfig | None = None
    calibration: CalibrationConfig | None = None
    aim: AimConfig | None = None

    def to_yaml(self) -> str:
        """The recipe as YAML that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(_plain(self), sort_keys=False, default_flow_style=None)


def _plain(config: MergeConfig) -> dict[str, Any]:
    """The config as plain data, with model references in their string form."""

    def convert(value: Any) -> Any:
        if isinstance(value, ModelRef):
            if value.override_architecture:
                return {"model": str(value), "override_architecture": value.override_architecture}
            return str(value)
        if isinstance(value, BaseModel):
            return {
                k: convert(getattr(value, k))
                for k in type(value).model_fields
                if k in value.model_fields_set and getattr(value, k) is not None
            }
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    plain: dict[str, Any] = convert(config)
    return plain


def model_refs(config: MergeConfig) -> list[ModelRef]:
    """Every model reference in the config, in first-mention order, each once."""
    groups: list[tuple[list[InputModel], list[OutputSlice]]] = [
        (config.models or [], config.slices or [])
    ]
    groups += [(m.models or [], m.slices or []) for m in (config.modules or {}).values()]
    refs: list[ModelRef] = []
    for models, slices in groups:
        refs += [m.model for m in models]
        for output_slice in slices:
            refs += [s.model for s in output_slice.sources]
            refs += [output_slice.base_model] if output_slice.base_model else []
    refs += [config.base_model] if config.base_model else []
    unique: dict[str, ModelRef] = {}
    for ref in refs:
        unique.setdefault(str(ref), ref)
    return list(unique.values())


def recipe_hash(config: MergeConfig) -> str:
    """A stable sha256 of the recipe: equal for configs that mean the same merge.

    Key order, YAML formatting and comments do not change it; any value does.
    """
    text = json.dumps(_plain(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def load_config(
    source: str | Path | Mapping[str, Any] | MergeConfig, *, strict: bool = False
) -> MergeConfig:
    """Read and validate a merge config from a YAML file, YAML text, a dict or a MergeConfig.

    Every problem is collected and raised as one :class:`ConfigError`; parameters the method
    does not use are logged as warnings (errors with ``strict``).

    Example:
        >>> cfg = load_config({"merge_method": "linear", "models": [
        ...     {"model": "a", "parameters": {"weight": 1}},
        ...     {"model": "b", "parameters": {"weight": 1}}]})
        >>> cfg.merge_method
        'linear'
    """
    if isinstance(source, MergeConfig):
        config = source
    else:
        config = parse_config(_read_yaml(source) if not isinstance(source, Mapping) else source)
    for warning in check_config(config, strict=strict):
        log.warning(warning)
    return config


def _read_yaml(source: str | Path) -> Any:
    documents = read_documents(source)
    if len(documents) != 1:
        raise ConfigError(
            f"{_describe(source)} holds {len(documents)} YAML documents: a multi-stage recipe "
            "runs with alloykit merge (alloykit.merge), one document at a time elsewhere"
        )
    return documents[0]


def _describe(source: str | Path) -> str:
    path = Path(source) if isinstance(source, Path) or "\n" not in str(source) else None
    return f"config file '{path}'" if path is not None else "config"


def read_yaml_mapping(
    path: Path, where: str, error: type[AlloyError], expected: str
) -> dict[str, Any]:
    """The mapping a YAML file (a task or search file) holds, or ``error`` naming ``where``:
    the file is missing, is not YAML, or holds something else ("must be a mapping with
    ``expected``")."""
    if not path.is_file():
        raise error(f"{where} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise error(f"{where} must be a mapping with {expected}")
    return raw


def read_documents(source: str | Path) -> list[dict[str, Any]]:
    """The YAML documents of a config file or text (several for a multi-stage recipe)."""
    path = Path(source) if isinstance(source, Path) or "\n" not in str(source) else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file '{source}' does not exist")
    text = path.read_text() if path is not None else str(source)
    where = _describe(source)
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from e
    if not documents:
        raise ConfigError(f"{where} is empty")
    for document in documents:
        if not isinstance(document, dict):
            raise ConfigError(f"{where} must hold mappings with merge_method, models or slices")
    return documents


def parse_config(data: Mapping[str, Any]) -> MergeConfig:
    """Build a MergeConfig from plain data; schema problems are raised all at once."""
    try:
        return MergeConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError([_format_pydantic_error(err) for err in e.errors()]) from e


def _format_pydantic_error(error: Mapping[str, Any]) -> str:
    location = [str(p) for p in error["loc"]]
    path = yaml_path(*[int(p) if p.isdigit() else p for p in location])
    if error["type"] == "extra_forbidden":
        parent = location[-2] if len(location) > 1 else None
        if len(location) == 3 and location[0] == "modules":
            parent = "modules.*"
        fields = _fields_at(parent)
        hint = did_you_mean(location[-1], fields) if fields else ""
        return f"{path}: unknown key{hint}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{path}: {message}"


def _fields_at(parent: str | None) -> list[str]:
    owners: dict[str | None, type[BaseModel]] = {
        None: MergeConfig,
        "models": InputModel,
        "slices": OutputSlice,
        "sources": SliceSource,
        "tokenizer": TokenizerConfig,
        "heads": HeadsConfig,
        "modules.*": ModuleConfig,
        "calibration": CalibrationConfig,
        "aim": AimConfig,
    }
    owner = owners.get(parent) if parent is None or not parent.isdigit() else None
    return list(owner.model_fields) if owner else []


def yaml_path(*parts: str | int) -> str:
    """``("models", 1, "parameters", "density")`` -> ``models[1].parameters.density``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
    return text


# --------------------------------------------------------------------------- validation


def check_config(config: MergeConfig, *, strict: bool = False) -> list[str]:
    """Validate what the schema cannot: method, parameters, dtypes, layer ranges, tokenizer.

    Returns the warnings; raises one ConfigError listing every problem.
    """
    from alloykit.methods import Method, resolve_method

    problems: list[str] = []
    warnings: list[str] = []
    method: Method | None = None
    try:
        method = resolve_method(config.merge_method)
    except ConfigError as e:
        problems.extend(e.problems)
    given = [k for k in ("models", "slices", "modules") if getattr(config, k) is not None]
    if len(given) != 1:
        found = f" (got {', '.join(given)})" if given else ""
        problems.append(f"config: give exactly one of 'models', 'slices' or 'modules'{found}")
    for name, module in (config.modules or {}).items():
        if (module.models is None) == (module.slices is None):
            problems.append(
                f"{yaml_path('modules', name)}: give exactly one of 'models' or 'slices'"
            )
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key)
        if value is not None and normalize_dtype(value) is None:
            problems.append(f"{key}: unknown dtype '{value}' (use one of {', '.join(DTYPES)})")
    problems.extend(_check_inputs(config))
    if config.keep_from_base:
        from alloykit.architecture import MODULE_KINDS

        for i, kind in enumerate(config.keep_from_base):
            if kind not in MODULE_KINDS:
                problems.append(
                    f"keep_from_base[{i}]: unknown module kind '{kind}'{did_you_mean(kind, MODULE_KINDS)}; "
                    f"kinds are {', '.join(MODULE_KINDS)}"
                )
        if config.base_model is None:
            problems.append("keep_from_base: needs a base_model to keep tensors from")
    problems.extend(_check_tokenizer(config))
    if config.heads is not None:
        labels = [str(ref) for ref in model_refs(config)]
        if str(config.heads.source) not in labels:
            listing = ", ".join(f"'{label}'" for label in labels)
            problems.append(
                f"heads.source: '{config.heads.source}' is not one of the config's models "
                f"({listing}){did_you_mean(str(config.heads.source), labels)}"
            )
    if method is not None:
        for path, name, value in _parameter_sites(config):
            group = path[2:] if path[0] == "modules" else path  # a module's own models/slices
            per_model_site = group[0] == "models" or "sources" in group
            param = method.param(name)
            where = yaml_path(*path)
            if param is None:
                names = ", ".join(p.name for p in method.params)
                hint = did_you_mean(name, [p.name for p in method.params])
                warnings.append(
                    f"{where}: '{name}' is not a parameter of {method.name}{hint}; "
                    f"its parameters are {names}"
                )
                continue
            if per_model_site and not param.per_model:
                warnings.append(
                    f"{where}: '{name}' is a global parameter of {method.name} and is ignored "
                    "per model; set it under the top-level or slice 'parameters'"
                )
            problems.extend(_check_setting(param, value, path))
        if method.base == "required" and config.base_model is None and not _slice_bases(config):
            problems.append(f"base_model: {method.name} needs a base_model")
        if method.statistics is not None and config.calibration is None:
            problems.append(
                f"calibration: {method.name} needs calibration data; add "
                "calibration: {data: FILE.jsonl, samples: 128, sequence_length: 512}"
            )
        if config.calibration is not None and method.statistics is None and config.aim is None:
            warnings.append(
                f"calibration: {method.name} uses no calibration data and no aim: is set; "
                "the section is ignored"
            )
    if config.aim is not None:
        if config.calibration is None:
            problems.append(
                "aim: needs calibration data to measure the base's activations; add "
                "calibration: {data: FILE.jsonl}"
            )
        if config.base_model is None:
            problems.append("aim: needs a base_model whose salient weights it protects")
    if strict and warnings:
        problems.extend(f"{w} (--strict)" for w in warnings)
        warnings = []
    if problems:
        raise ConfigError(problems)
    return warnings


def _slice_bases(config: MergeConfig) -> bool:
    slices = [s for _, _, group in _input_groups(config) for s in group or []]
    has_models = any(models is not None for _, models, _ in _input_groups(config))
    return bool(slices) and not has_models and all(s.base_model is not None for s in slices)


def _input_groups(
    config: MergeConfig,
) -> list[tuple[tuple[str, ...], list[InputModel] | None, list[OutputSlice] | None]]:
    """(YAML path prefix, models, slices) of the config and of each of its modules."""
    groups: list[tuple[tuple[str, ...], list[InputModel] | None, list[OutputSlice] | None]] = [
        ((), config.models, config.slices)
    ]
    for name, module in (config.modules or {}).items():
        groups.append((("modules", name), module.models, module.slices))
    return groups


def _parameter_sites(config: MergeConfig) -> list[tuple[tuple[str | int, ...], str, Any]]:
    """Every (YAML path, parameter name, value) in the config."""
    sites: list[tuple[tuple[str | int, ...], str, Any]] = []
    sites += [(("parameters", k), k, v) for k, v in config.parameters.items()]
    for name, module in (config.modules or {}).items():
        sites += [(("modules", name, "parameters", k), k, v) for k, v in module.parameters.items()]
    for top, models, slices in _input_groups(config):
        for i, entry in enumerate(models or []):
            sites += [
                ((*top, "models", i, "parameters", k), k, v) for k, v in entry.parameters.items()
            ]
        for i, output_slice in enumerate(slices or []):
            sites += [
                ((*top, "slices", i, "parameters", k), k, v)
                for k, v in output_slice.parameters.items()
            ]
            for j, source in enumerate(output_slice.sources):
                prefix: tuple[str | int, ...] = (*top, "slices", i, "sources", j, "parameters")
                sites += [((*prefix, k), k, v) for k, v in source.parameters.items()]
    return sites


def _check_setting(param: Any, value: Any, path: tuple[str | int, ...]) -> list[str]:
    """Problems with one parameter setting: scalar, gradient or list of {filter, value}."""
    where = yaml_path(*path)
    if isinstance(value, dict):
        value = [value]  # MergeKit's schema accepts one bare {filter, value}; treat as a list
    if isinstance(value, list):
        if not value:
            return [f"{where}: empty list"]
        if all(isinstance(v, dict) for v in value):
            problems = []
            for i, entry in enumerate(value):
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    problems.append(f"{yaml_path(*path, i)}: expected {{filter, value}}")
                    continue
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    problems.append(f"{yaml_path(*path, i, 'filter')}: must be a string or null")
                problems += _check_setting(param, entry["value"], (*path, i, "value"))
            return problems
        if any(isinstance(v, dict | list) for v in value):
            return [f"{where}: mix of filters and values; use a list of {{filter, value}}"]
        if param.kind in ("bool", "choice"):
            kind = "true or false" if param.kind == "bool" else "one value"
            return [f"{where}: {param.name} takes {kind}, not a list"]
        return [f"{yaml_path(*path, i)}: {p}" for i, v in enumerate(value) if (p := param.check(v))]
    problem = param.check(value)
    return [f"{where}: {problem}"] if problem else []


def _check_inputs(config: MergeConfig) -> list[str]:
    problems: list[str] = []
    refs: list[tuple[str, ModelRef]] = []
    for top, models, slices in _input_groups(config):
        problems += _check_group(top, models, slices, refs)
    return problems


def _check_group(
    top: tuple[str, ...],
    models: list[InputModel] | None,
    slices: list[OutputSlice] | None,
    refs: list[tuple[str, ModelRef]],
) -> list[str]:
    """Problems with one ``models``/``slices`` group (the config's or a module's)."""
    problems = []
    listed: dict[str, str] = {}
    for i, entry in enumerate(models or []):
        where = yaml_path(*top, "models", i, "model")
        if str(entry.model) in listed:
            problems.append(
                f"{where}: '{entry.model}' is already listed at {listed[str(entry.model)]}"
            )
        listed.setdefault(str(entry.model), where)
        refs.append((where, entry.model))
    for i, output_slice in enumerate(slices or []):
        if not output_slice.sources:
            problems.append(f"{yaml_path(*top, 'slices', i, 'sources')}: a slice needs sources")
        lengths = set()
        for j, source in enumerate(output_slice.sources):
            where = yaml_path(*top, "slices", i, "sources", j)
            if source.model in [s.model for s in output_slice.sources[:j]]:
                problems.append(f"{where}.model: '{source.model}' appears twice in one slice")
            refs.append((f"{where}.model", source.model))
            start, end = source.layer_range
            if start < 0 or end <= start:
                problems.append(
                    f"{where}.layer_range: [{start}, {end}] is not [start, end) with 0 <= start < end"
                )
            lengths.add(end - start)
        if len(lengths) > 1:
            problems.append(
                f"{yaml_path(*top, 'slices', i, 'sources')}: layer ranges of one slice must have "
                f"the same length (got {sorted(lengths)})"
            )
        if output_slice.base_model is not None:
            refs.append((yaml_path(*top, "slices", i, "base_model"), output_slice.base_model))
    if models is not None and not models:
        problems.append(f"{yaml_path(*top, 'models')}: the list is empty")
    return problems


def _check_tokenizer(config: MergeConfig) -> list[str]:
    problems = []
    if config.tokenizer_source is not None and config.tokenizer is not None:
        problems.append("tokenizer_source: give either tokenizer_source or tokenizer, not both")
    if config.chat_template is not None:
        template = config.chat_template
        known = template == "auto" or template in BUILTIN_CHAT_TEMPLATES
        if not known and (len(template) < 20 or "{" not in template):
            problems.append(
                f"chat_template: '{template}' is neither 'auto', a built-in template "
                f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a Jinja template"
            )
    source, where = config.tokenizer_source, "tokenizer_source"
    if config.tokenizer is not None:
        source, where = config.tokenizer.source, "tokenizer.source"
        if config.tokenizer.missing_rows not in MISSING_ROWS:
            problems.append(
                f"tokenizer.missing_rows: '{config.tokenizer.missing_rows}' is not one of "
                f"{', '.join(MISSING_ROWS)}"
            )
        for token, entry in (config.tokenizer.tokens or {}).items():
            if entry is not None and (
                not isinstance(entry, dict) or set(entry) - {"source", "force"}
            ):
                problems.append(f"tokenizer.tokens.{token}: expected {{source, force}}")
    labels = [str(ref) for ref in model_refs(config)]
    if source is not None and source not in ("base", "union") and source not in labels:
        listing = ", ".join(f"'{label}'" for label in labels)
        problems.append(
            f"{where}: '{source}' is not base, union or one of the config's models "
            f"({listing}){did_you_mean(source, ['base', 'union', *labels])}"
        )
    return problems


def normalize_dtype(name: str) -> str | None:
    """``"torch.bfloat16"``, ``"bf16"`` -> ``"bfloat16"``; None for an unknown name."""
    key = name.removeprefix("torch.").lower()
    return DTYPES.get(key) or DTYPE_ALIASES.get(key)


# --------------------------------------------------------------------------- resolution


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one parameter setting for ``tensor_name`` at layer fraction ``t``.

    - a scalar is itself;
    - a list of numbers is a gradient, interpolated piecewise-linearly: ``s = t·(n−1)``,
      value ``(1−f)·v[floor(s)] + f·v[floor(s)+1]`` with ``f = s − floor(s)``;
    - a list of other scalars picks ``v[int(t·(n−1))]``;
    - a list of ``{filter, value}`` entries: the first whose filter is null, ``"*"`` or a
      substring of ``tensor_name`` gives the value; no match gives None (the caller falls
      through to the next level).

    Example:
        >>> evaluate_setting([0.0, 1.0, 0.0], "model.layers.1.mlp.up_proj.weight", 0.25)
        0.5
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if setting and all(isinstance(entry, dict) for entry in setting):
        for entry in setting:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or pattern in tensor_name:
                return evaluate_setting(entry["value"], tensor_name, t)
        return None
    if all(isinstance(v, int | float) for v in setting):
        position = t * (len(setting) - 1)
        low = min(math.floor(position), len(setting) - 1)
        high = min(len(setting) - 1, low + 1)
        fraction = position - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    return setting[int(t * (len(setting) - 1))]


def resolve_parameter(
    name: str,
    *,
    per_model: bool,
    levels: list[Mapping[str, Any] | None],
    input_name: str,
    output_name: str,
    t: float,
) -> Any:
    """MergeKit's precedence: the first level whose setting matches gives the value.

    ``levels`` is, highest first: the source's own parameters (per-model parameters only),
    the slice's, the module's (``modules.<name>.parameters``, when planning a module), the
    top-level ones. Per-model parameters match filters against the input
    model's tensor name, global parameters against the output tensor name. Returns None when
    no level gives a value (the caller applies the default or reports a missing parameter).
    """
    tensor_name = input_name if per_model else output_name
    for level in levels if per_model else levels[1:]:
        if level and name in level:
            value = evaluate_setting(level[name], tensor_name, t)
            if value is not None:
                return value
    return None
