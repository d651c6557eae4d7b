"""From a config and opened checkpoints to a MergePlan: a flat list of tensor jobs.

Planning is pure: it reads names, shapes, dtypes and configs, never tensor data. Each
:class:`TensorJob` says which tensors of which models go into one output tensor, with which
method and fully resolved parameters, so ``--dry-run`` can print exactly what will happen and
every problem (a missing tensor or parameter, a shape mismatch) is found before the first read.

MergeKit's slice rules: the ``models:`` form is one slice spanning every layer of every model;
output layers are numbered slice after slice; embeddings come from the first slice's sources
and the final norm and head from the last slice's; layer ``k`` of a slice of ``L`` layers gets
the layer fraction ``t = k/(L−1)`` (``t = 1`` when ``L = 1``), embeddings and head ``t = 0``.

Backbones and heads: a task model (``BertForSequenceClassification``) stores its backbone under
its ``base_model_prefix`` (``bert.embeddings...``) and its task head outside it
(``classifier.weight``); the bare backbone (``BertModel``) stores the same tensors without the
prefix. Tensors are matched across that prefix, and the output is named like the base (or first)
model, or like the ``heads.source`` model when the config has one. Task-head tensors that only
some models have, or that differ in shape, are left out with one warning, unless ``heads.source``
names the model to copy them from.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alloykit.architecture import (
    HEAD_NAMES,
    LAYER_COUNT_KEYS,
    architecture_family,
    backbone_prefix,
    input_embedding_name,
    is_vocabulary_tensor,
    layer_count,
    layer_stack_prefix,
    layer_stacks,
    module_kind,
    split_layer_name,
    tensor_position,
)
from alloykit.config import (
    AimConfig,
    CalibrationConfig,
    MergeConfig,
    model_refs,
    normalize_dtype,
    resolve_parameter,
    yaml_path,
)
from alloykit.errors import ConfigError, IncompatibleModels, did_you_mean
from alloykit.io.checkpoint import (
    DTYPE_CODES,
    FLOAT_CODES,
    SAFETENSORS_DTYPES,
    Checkpoint,
    TensorInfo,
)
from alloykit.methods import Method, Param, resolve_method
from alloykit.tokenizer import OutputTokenizer, VocabularyPlan, plan_tokenizer

COPY = "copy"  # the job "method" for tensors that are not merged (integer buffers)
VOCAB_SIZE_KEYS = ("vocab_size", "n_vocab", "padded_vocab_size")


@dataclass(frozen=True)
class TensorInput:
    """One input of a job: tensor ``tensor`` of model ``model`` (a model label)."""

    model: str
    tensor: str


@dataclass(frozen=True)
class TensorJob:
    """How to make one output tensor.

    ``inputs`` are the models the method combines, in config order; ``base`` is the base
    model's tensor for methods that use one. ``per_model`` maps each per-model parameter to one
    value per input; ``params`` holds the global parameters.
    """

    output: str
    shape: tuple[int, ...]
    dtype: str  # output safetensors dtype code
    method: str
    inputs: tuple[TensorInput, ...]
    base: TensorInput | None
    per_model: Mapping[str, tuple[float, ...]]
    params: Mapping[str, Any]
    input_bytes: int
    vocabulary: bool = False  # rows are re-indexed to the output vocabulary before the method

    @property
    def output_bytes(self) -> int:
        return TensorInfo(self.output, self.shape, self.dtype, Path()).nbytes


@dataclass
class MergePlan:
    """Everything a merge will do, before it does it."""

    jobs: list[TensorJob]
    kernel: Method  # the registry row (or step composition) every merged job runs
    models: dict[str, Path]  # model label -> local folder
    donor: str  # the model whose config, generation config and tokenizer are copied
    config: dict[str, Any] | None  # output config.json without its dtype
    output_dtype: str  # torch name written to config.json
    load_dtype: str | None  # config `dtype`: inputs are rounded to it when read
    layers: int
    warnings: list[str] = field(default_factory=list)
    calibration: CalibrationConfig | None = None  # data for methods that measure statistics
    aim: AimConfig | None = None  # activation-informed merging after the method
    base_model: str | None = None  # the base model's label
    tokenizer: OutputTokenizer | None = None  # the tokenizer to write, when the config builds one

    @property
    def method(self) -> str:
        return self.kernel.name

    @property
    def input_bytes(self) -> int:
        return sum(job.input_bytes for job in self.jobs)

    @property
    def output_bytes(self) -> int:
        return sum(job.output_bytes for job in self.jobs)


@dataclass(frozen=True)
class _Source:
    model: str
    start: int
    end: int
    parameters: Mapping[str, Any]
    where: str  # YAML path, for messages


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    base: str | None
    parameters: Mapping[str, Any]

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


def build_plan(
    config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *, allow_crimes: bool = False
) -> MergePlan:
    """Plan the merge of ``config`` over opened ``checkpoints`` (keyed by model label).

    Raises ConfigError for missing parameters or bad layer ranges and IncompatibleModels for
    models that do not fit together (architecture, missing tensors, shapes), each naming the
    model, tensor or key.
    """
    method = resolve_method(config.merge_method)
    donor = str(config.base_model) if config.base_model else _first_model(config)
    check_architectures(checkpoints, donor, allow_crimes=allow_crimes)
    load_dtype = normalize_dtype(config.dtype) if config.dtype else None
    out_dtype = normalize_dtype(config.out_dtype or config.dtype or "") or None
    if config.modules is not None:
        return _module_plan(config, checkpoints, method, donor, load_dtype, out_dtype)
    check_one_stack(config, checkpoints)
    tokenizer = plan_tokenizer(config, checkpoints, donor)
    vocabulary = tokenizer.vocabulary if tokenizer is not None else None
    jobs, slices, offset, planner = _plan_jobs(
        config, checkpoints, method, out_dtype, {}, vocabulary
    )

    # the heads' model gives the config too, so the output loads as that task model
    donor = planner.heads_source or donor
    donor_ckpt = checkpoints[donor]
    output_config = _output_config(donor_ckpt, slices, offset, jobs)
    if tokenizer is not None and output_config is not None:
        output_config = _tokenizer_config(output_config, tokenizer, donor)
    return MergePlan(
        jobs=jobs,
        kernel=method,
        models={label: ckpt.folder for label, ckpt in checkpoints.items()},
        donor=donor,
        config=output_config,
        output_dtype=out_dtype or _donor_dtype(donor_ckpt, jobs),
        load_dtype=load_dtype,
        layers=offset,
        warnings=planner.warnings + (vocabulary.warnings if vocabulary is not None else []),
        tokenizer=tokenizer,
        **_data_fields(config),
    )


def _data_fields(config: MergeConfig) -> dict[str, Any]:
    """The plan's calibration, AIM and base-model fields, from the config."""
    base = str(config.base_model) if config.base_model is not None else None
    return {"calibration": config.calibration, "aim": config.aim, "base_model": base}


def _donor_dtype(donor: Checkpoint, jobs: Sequence[TensorJob]) -> str:
    """The output dtype when none is configured: the donor's, as its config or first tensor says."""
    config = donor.config or {}
    named = config.get("dtype") or config.get("torch_dtype")
    from_config = normalize_dtype(named) if isinstance(named, str) else None
    first_float = next((j.dtype for j in jobs if j.dtype in FLOAT_CODES), "F32")
    return from_config or _torch_name(first_float)


def _plan_jobs(
    config: MergeConfig,
    checkpoints: Mapping[str, Checkpoint],
    method: Method,
    out_dtype: str | None,
    module_parameters: Mapping[str, Any],
    vocabulary: VocabularyPlan | None = None,
) -> tuple[list[TensorJob], list[_Slice], int, _Planner]:
    """The jobs of a config's ``models``/``slices`` over ``checkpoints``: (jobs, slices, layers,
    planner)."""
    slices = _slices(config, checkpoints, method)
    planner = _Planner(method, config, checkpoints, out_dtype, module_parameters, vocabulary)
    jobs: list[TensorJob] = []
    first, last = slices[0], slices[-1]
    jobs += planner.non_layer_jobs(first, "pre")
    offset = 0
    for output_slice in slices:
        for k in range(output_slice.length):
            t = k / (output_slice.length - 1) if output_slice.length > 1 else 1.0
            jobs += planner.layer_jobs(output_slice, k, offset + k, t)
        offset += output_slice.length
    jobs += planner.non_layer_jobs(last, "post")
    planner.raise_problems()
    planner.warn_heads()
    if config.models is not None:  # with slices, leaving layers out is the point
        planner.warn_unused(jobs)
    return jobs, slices, offset, planner


def check_one_stack(
    config: MergeConfig, checkpoints: Mapping[str, Checkpoint], where: str = "slices"
) -> None:
    """Refuse ``slices:`` over a model with several layer stacks (encoder-decoder, VLM).

    A ``layer_range`` cannot say which stack it means; MergeKit refuses it too and asks for
    ``modules:``.
    """
    if config.slices is None:
        return
    for label in model_labels(config):
        stacks = layer_stacks(checkpoints[label].tensors)
        if len(stacks) > 1:
            listing = ", ".join(f"'{stack}'" for stack in stacks)
            names = ", ".join(f"{name}: {{slices: [...]}}" for name in stack_module_names(stacks))
            raise ConfigError(
                f"{where}: model '{label}' has {len(stacks)} layer stacks ({listing}), so a "
                f"layer_range is ambiguous; use modules: {{{names}}} (one module per stack)"
            )


def stack_module_names(stacks: list[str]) -> list[str]:
    """The shortest tensor-name prefixes that tell ``stacks`` apart: their module names.

    ``model.encoder.layers.``, ``model.decoder.layers.`` -> ``model.encoder``, ``model.decoder``.
    """
    parts = [stack.rstrip(".").split(".") for stack in stacks]
    depth = 0
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    names: dict[str, None] = {".".join(p[: depth + 1]): None for p in parts}
    return list(names)


def _restricted(checkpoint: Checkpoint, prefix: str) -> Checkpoint:
    """A view of ``checkpoint`` holding only its tensors under ``prefix`` (for planning).

    Its config is dropped, so layer counts come from the module's own tensors, not from a
    config key that may describe another module's stack.
    """
    view = copy.copy(checkpoint)
    view.tensors = {n: i for n, i in checkpoint.tensors.items() if n.startswith(prefix)}
    view.config = None
    return view


def _module_plan(
    config: MergeConfig,
    checkpoints: Mapping[str, Checkpoint],
    method: Method,
    donor: str,
    load_dtype: str | None,
    out_dtype: str | None,
) -> MergePlan:
    """Plan ``modules:``: each module merges the tensors under ``<name>.`` like a whole config.

    Tensors under no module's prefix are copied from the donor (base or first model); with a
    merged vocabulary, a token-embedding or head tensor among them is the donor's aligned rows.
    """
    assert config.modules is not None
    tokenizer = plan_tokenizer(config, checkpoints, donor)
    vocabulary = tokenizer.vocabulary if tokenizer is not None else None
    jobs: list[TensorJob] = []
    warnings: list[str] = list(vocabulary.warnings) if vocabulary is not None else []
    layers = 0
    donor_tensors = checkpoints[donor].tensors
    donor_config = checkpoints[donor].config
    output_config = copy.deepcopy(donor_config) if donor_config is not None else None
    for name, module in config.modules.items():
        prefix = name + "."
        where = yaml_path("modules", name)
        if not any(n.startswith(prefix) for n in donor_tensors):
            tops = sorted({n.split(".")[0] for n in donor_tensors})
            raise ConfigError(
                f"{where}: model '{donor}' has no tensors under '{prefix}' (a module is named "
                f"by its tensor prefix; this model's are {', '.join(tops)})"
                + did_you_mean(name, tops)
            )
        sub = config.model_copy(
            update={"models": module.models, "slices": module.slices, "modules": None}
        )
        labels = model_labels(sub)
        views = {label: _restricted(checkpoints[label], prefix) for label in labels}
        check_one_stack(sub, views, where=f"{where}.slices")
        module_jobs, _, module_layers, planner = _plan_jobs(
            sub, views, method, out_dtype, module.parameters, vocabulary
        )
        jobs += module_jobs
        layers += module_layers
        warnings += [f"{where}: {w}" for w in planner.warnings]
        stacks = layer_stacks(views[donor].tensors) if donor in views else []
        donor_layers = layer_count(None, views[donor].tensors)[0] if donor in views else 0
        if stacks and module_layers != donor_layers:
            key = _set_module_layers(output_config, name, donor_layers, module_layers)
            if key is None:
                warnings.append(
                    f"{where}: the output has {module_layers} layer(s) under '{stacks[0]}' where "
                    f"model '{donor}' has {donor_layers}, and no config.json key of '{donor}' "
                    "holds this module's layer count; update it in the output's config.json"
                )
    prefixes = tuple(name + "." for name in config.modules)
    rest = [n for n in donor_tensors if not n.startswith(prefixes)]
    if rest:
        out_code = DTYPE_CODES[_torch_dtype(out_dtype)] if out_dtype else None
        for name in rest:
            info = donor_tensors[name]
            dtype = out_code if out_code and info.dtype in FLOAT_CODES else info.dtype
            job = _copy_job(name, donor, info, dtype)
            if vocabulary is not None and is_vocabulary_tensor(name):
                holders = {
                    label: c.tensors[name] for label, c in checkpoints.items() if name in c.tensors
                }
                job = _aligned(job, (vocabulary.rows, *info.shape[1:]), holders)
            jobs.append(job)
        warnings.append(
            f"modules: {len(rest)} tensors of model '{donor}' are under no module (e.g. "
            f"'{rest[0]}'); they are copied from '{donor}' unchanged"
        )
    donor_ckpt = checkpoints[donor]
    if tokenizer is not None and output_config is not None:
        output_config = _tokenizer_config(output_config, tokenizer, donor)
    return MergePlan(
        jobs=jobs,
        kernel=method,
        models={label: ckpt.folder for label, ckpt in checkpoints.items()},
        donor=donor,
        config=output_config,
        output_dtype=out_dtype or _donor_dtype(donor_ckpt, jobs),
        load_dtype=load_dtype,
        layers=layers,
        warnings=warnings,
        tokenizer=tokenizer,
        **_data_fields(config),
    )


_MODULE_SECTIONS = {
    "language_model": "text_config",
    "text_model": "text_config",
    "vision_tower": "vision_config",
    "vision_model": "vision_config",
    "audio_tower": "audio_config",
}


def _set_module_layers(
    config: dict[str, Any] | None, module: str, old: int, new: int
) -> str | None:
    """Set the layer count of ``module`` in ``config`` to ``new``; the key set, or None.

    The key is ``<last>_layers`` / ``num_<last>_layers`` (BART's ``decoder_layers``) or a layer
    count key of the module's sub-config (``text_config.num_hidden_layers`` for
    ``language_model``), where ``<last>`` is the module name's last component; only a key whose
    value is the module's input layer count ``old`` is changed.
    """
    if config is None:
        return None
    last = module.rsplit(".", 1)[-1]
    for key in (f"{last}_layers", f"num_{last}_layers", f"{last}_num_layers"):
        if config.get(key) == old:
            config[key] = new
            return key
    section = config.get(_MODULE_SECTIONS.get(last, f"{last}_config"))
    if isinstance(section, dict):
        for key in LAYER_COUNT_KEYS:
            if section.get(key) == old:
                section[key] = new
                return key
    return None


def model_labels(config: MergeConfig) -> list[str]:
    """Every model the config references, as labels, in first-mention order."""
    return [str(ref) for ref in model_refs(config)]


def _first_model(config: MergeConfig) -> str:
    if config.models:
        return str(config.models[0].model)
    if config.slices:
        return str(config.slices[0].sources[0].model)
    return model_labels(config)[0]  # modules: the first model of the first module


def check_architectures(
    checkpoints: Mapping[str, Checkpoint], donor: str, *, allow_crimes: bool
) -> None:
    """Refuse models whose ``model_type`` or ``architectures`` differ, unless ``allow_crimes``."""
    reference = checkpoints[donor].config
    if reference is None or allow_crimes:
        return
    for label, ckpt in checkpoints.items():
        if ckpt.config is None:
            continue
        for key in ("model_type", "architectures"):
            ours, theirs = reference.get(key), ckpt.config.get(key)
            if ours != theirs and not (key == "architectures" and _same_family(ours, theirs)):
                raise IncompatibleModels(
                    f"models '{donor}' and '{label}' have different {key} "
                    f"({reference.get(key)} vs {ckpt.config.get(key)}); "
                    "pass --allow-crimes to merge them anyway"
                )


def _same_family(ours: Any, theirs: Any) -> bool:
    """True for a backbone and task models built on it (``BertModel``, ``BertFor...``)."""
    if not isinstance(ours, list) or not isinstance(theirs, list) or len(ours) != len(theirs):
        return False
    return all(
        isinstance(a, str)
        and isinstance(b, str)
        and architecture_family(a) == architecture_family(b)
        for a, b in zip(ours, theirs, strict=True)
    )


def _slices(
    config: MergeConfig, checkpoints: Mapping[str, Checkpoint], method: Method
) -> list[_Slice]:
    """The config's output slices; the ``models:`` form becomes one slice over every layer."""
    base = str(config.base_model) if config.base_model else None
    counts = {
        label: layer_count(ckpt.config, ckpt.tensors)[0] for label, ckpt in checkpoints.items()
    }
    if config.models is not None:
        entries = [
            (str(m.model), m.parameters, yaml_path("models", i))
            for i, m in enumerate(config.models)
        ]
        if base is not None and base not in [e[0] for e in entries]:
            entries.append((base, {}, "base_model"))
        layer_counts = {counts[label] for label, _, _ in entries}
        if len(layer_counts) > 1:
            listing = ", ".join(f"'{label}': {counts[label]}" for label, _, _ in entries)
            raise IncompatibleModels(
                f"models have different numbers of layers ({listing}); use slices: to choose "
                "which layers to merge"
            )
        n = layer_counts.pop()
        sources = tuple(_Source(label, 0, n, params, where) for label, params, where in entries)
        return [_Slice(sources, base, {})]

    problems = []
    slices = []
    for i, output_slice in enumerate(config.slices or []):
        slice_sources: list[_Source] = []
        for j, source in enumerate(output_slice.sources):
            label = str(source.model)
            start, end = source.layer_range
            where = yaml_path("slices", i, "sources", j)
            if end > counts[label]:
                problems.append(
                    f"{where}.layer_range: [{start}, {end}] is past the last layer of "
                    f"'{label}', which has {counts[label]} layers"
                )
            slice_sources.append(_Source(label, start, end, source.parameters, where))
        slice_base = str(output_slice.base_model) if output_slice.base_model else base
        if method.base == "required" and slice_base not in [s.model for s in slice_sources]:
            problems.append(
                f"{yaml_path('slices', i, 'sources')}: {method.name} needs the base model "
                f"'{slice_base}' among the slice's sources (with the same layer_range length)"
            )
        slices.append(_Slice(tuple(slice_sources), slice_base, output_slice.parameters))
    if problems:
        raise ConfigError(problems)
    return slices


class _Planner:
    """Builds the jobs of one plan, collecting problems so they are reported together."""

    def __init__(
        self,
        method: Method,
        config: MergeConfig,
        checkpoints: Mapping[str, Checkpoint],
        out_dtype: str | None,
        module_parameters: Mapping[str, Any],
        vocabulary: VocabularyPlan | None = None,
    ) -> None:
        self.method = method
        self.vocabulary = vocabulary
        self.top = config.parameters
        self.module = module_parameters  # modules.<name>.parameters, between slice and top
        self.keep = set(config.keep_from_base or ())
        self.checkpoints = checkpoints
        self.out_dtype = DTYPE_CODES[_torch_dtype(out_dtype)] if out_dtype else None
        self.stack = {label: layer_stack_prefix(c.tensors) for label, c in checkpoints.items()}
        self.problems: dict[str, tuple[str, int]] = {}  # key -> (message, count)
        self.warnings: list[str] = []
        self.heads_source = str(config.heads.source) if config.heads else None
        shapes = [{n: i.shape for n, i in c.tensors.items()} for c in checkpoints.values()]
        # finding prefixes imports transformers (seconds): only models that differ need them
        differ = any(other != shapes[0] for other in shapes[1:]) or self.heads_source is not None
        found = (
            {backbone_prefix(c.config, c.tensors) for c in checkpoints.values()}
            if differ
            else set()
        )
        # a prefix found from one model's config applies to every model whose layer stack
        # starts with it, so a model without a config.json is matched too
        self.prefix = {
            label: next((p for p in sorted(found) if p and (stack or "").startswith(p)), "")
            for label, stack in self.stack.items()
        }
        # task heads: a prefixed model's tensors outside its backbone (LM heads have their own
        # rule, the tied-embedding fallback of _lookup)
        self.heads: dict[str, None] = {  # a dict keeps first-seen order
            name: None
            for label, c in checkpoints.items()
            if self.prefix[label]
            for name in c.tensors
            if not name.startswith(self.prefix[label]) and name not in HEAD_NAMES
        }
        self.left_out: list[str] = []  # head tensors no output has

    def _donor(self, output_slice: _Slice) -> str:
        return output_slice.base or output_slice.sources[0].model

    def non_layer_jobs(self, output_slice: _Slice, position: str) -> list[TensorJob]:
        """Embeddings (``pre``) or final norm and head (``post``) from a slice's sources."""
        donor = self._donor(output_slice)
        names = [
            n
            for n in self.checkpoints[donor].tensors
            if tensor_position(n, self.stack[donor]) == position
        ]
        if position == "post":  # a head some sources store and the donor ties to its embedding
            for source in output_slice.sources:
                names += [
                    h
                    for h in HEAD_NAMES
                    if h in self.checkpoints[source.model].tensors and h not in names
                ]
            names += [h for h in self.heads if h not in names]
        jobs = [
            self._job(
                output_slice,
                self._output_name(name, donor),
                {s.model: self._name_in(name, donor, s.model) for s in output_slice.sources},
                0.0,
                name,
            )
            for name in names
        ]
        return [job for job in jobs if job is not None]

    def layer_jobs(self, output_slice: _Slice, k: int, out_index: int, t: float) -> list[TensorJob]:
        """Jobs for layer ``k`` of a slice, written as output layer ``out_index``."""
        donor = self._donor(output_slice)
        donor_source = next(
            (s for s in output_slice.sources if s.model == donor), output_slice.sources[0]
        )
        jobs = []
        for name in self.checkpoints[donor].tensors:
            parts = split_layer_name(name)
            if (
                parts is None
                or parts.prefix != self.stack[donor]
                or parts.index != donor_source.start + k
            ):
                continue
            names = {
                s.model: self._name_in(parts.renumber(s.start + k), donor, s.model)
                for s in output_slice.sources
            }
            output = self._output_name(parts.renumber(out_index), donor)
            job = self._job(output_slice, output, names, t, name)
            if job is not None:
                jobs.append(job)
        return jobs

    def _name_in(self, name: str, source: str, target: str) -> str:
        """Tensor ``name`` of model ``source`` as model ``target`` names it.

        Backbone tensors differ by the models' backbone prefixes (``bert.``); heads keep their
        names in every model.
        """
        have, want = self.prefix[source], self.prefix[target]
        if have == want or name in self.heads:
            return name
        return want + name.removeprefix(have)

    def _output_name(self, name: str, donor: str) -> str:
        """The output's name for the donor's tensor ``name``: the heads' model's naming if any."""
        return self._name_in(name, donor, self.heads_source) if self.heads_source else name

    def warn_heads(self) -> None:
        """One warning naming the task-head tensors the output leaves out."""
        if not self.left_out:
            return
        names = ", ".join(f"'{name}'" for name in self.left_out)
        if self.heads_source is not None:
            reason = f"model '{self.heads_source}' (heads.source) does not have them"
        else:
            reason = (
                "only some models have them, or their shapes differ; set heads: {source: MODEL} "
                "to copy them from one model"
            )
        self.warnings.append(f"task-head tensors left out of the output: {names} ({reason})")

    def warn_unused(self, jobs: list[TensorJob]) -> None:
        """Warn about input tensors no job reads (the donor decides the output's tensors)."""
        used = {
            (i.model, i.tensor) for j in jobs for i in (*j.inputs, *([j.base] if j.base else []))
        }
        for label, checkpoint in self.checkpoints.items():
            # heads are reported by warn_heads, or copied from heads.source by choice
            unused = [
                name
                for name in checkpoint.tensors
                if (label, name) not in used and name not in self.heads
            ]
            if unused:
                self.warnings.append(
                    f"model '{label}': {len(unused)} tensors are not in the output (e.g. "
                    f"'{unused[0]}'); the output has the tensors of the base (or first) model"
                )

    def _problem(self, key: str, message: str) -> None:
        old = self.problems.get(key)
        self.problems[key] = (old[0], old[1] + 1) if old else (message, 1)

    def raise_problems(self) -> None:
        """Raise every collected problem at once (ConfigError or IncompatibleModels)."""
        if not self.problems:
            return
        messages = [
            msg + (f" (and {count - 1} more tensors)" if count > 1 else "")
            for msg, count in self.problems.values()
        ]
        if all(key.startswith("param") for key in self.problems):
            raise ConfigError(messages)
        raise IncompatibleModels("; ".join(messages))

    def _lookup(self, label: str, name: str) -> TensorInfo | None:
        tensors = self.checkpoints[label].tensors
        if name in tensors:
            return tensors[name]
        if name in HEAD_NAMES:  # a tied head: the model's embedding is its head
            embedding = input_embedding_name(tensors)
            return tensors.get(embedding) if embedding else None
        return None

    def _job(
        self,
        output_slice: _Slice,
        output: str,
        names: Mapping[str, str],
        t: float,
        donor_name: str,
    ) -> TensorJob | None:
        """The job for ``output``; None for a task head the output leaves out."""
        if output in self.heads:
            head = self._head(output, names)
            if head is not None:
                return head
            if output in self.left_out:
                return None
        donor = self._donor(output_slice)
        buffer = self._buffer_job(output, names, donor, donor_name)
        if buffer is not None:
            return buffer
        infos: dict[str, TensorInfo] = {}
        for label, name in names.items():
            info = self._lookup(label, name)
            if info is None:
                self._problem(
                    f"missing:{label}", f"tensor '{name}' is missing from model '{label}'"
                )
                continue
            infos[label] = info
        if donor not in infos:  # the base is not a source of this slice (linear without it)
            info = self._lookup(donor, donor_name)
            if info is not None:
                infos[donor] = info
        reference = infos.get(donor) or next(iter(infos.values()), None)
        if reference is None:
            return _empty_job(output)
        aligned = self.vocabulary is not None and is_vocabulary_tensor(output)
        if aligned:
            return self._vocabulary_job(output_slice, output, infos, names, t, reference)
        for label, info in infos.items():
            if info.shape != reference.shape:
                self._problem(
                    f"shape:{output}",
                    f"tensor '{info.name}' has shape {list(info.shape)} in model '{label}' but "
                    f"{list(reference.shape)} in model '{reference_label(infos, reference)}'"
                    + (
                        " (the vocabularies differ: set tokenizer_source: base or union to "
                        "align the rows by token, docs/config.md)"
                        if is_vocabulary_tensor(output)
                        else ""
                    ),
                )
        return self._merge_job(output_slice, output, infos, names, t, reference)

    def _buffer_job(
        self, output: str, names: Mapping[str, str], donor: str, donor_name: str
    ) -> TensorJob | None:
        """A known integer buffer (:data:`BUFFER_NAMES`) that the donor (the base, else the
        first model) holds and some models lack: copied from the donor, with a warning.

        ``position_ids`` and ``token_type_ids`` are index tables a model builds itself
        (non-persistent buffers since transformers 4.31), so a checkpoint saved by a newer
        transformers lacks the ones an older save of its base holds; they are not weights and
        nothing merges them. Any other tensor missing from a model is still a problem.
        """
        if output.rsplit(".", 1)[-1] not in BUFFER_NAMES:
            return None
        missing = [label for label, name in names.items() if self._lookup(label, name) is None]
        info = self._lookup(donor, donor_name)
        if not missing or info is None or info.dtype in FLOAT_CODES:
            return None
        self.warnings.append(
            f"buffer '{output}' is missing from model(s) {', '.join(repr(m) for m in missing)}; "
            f"copied from model '{donor}' (an index table, not a weight)"
        )
        return _copy_job(output, donor, info, info.dtype)

    def _vocabulary_job(
        self,
        output_slice: _Slice,
        output: str,
        infos: Mapping[str, TensorInfo],
        names: Mapping[str, str],
        t: float,
        reference: TensorInfo,
    ) -> TensorJob | None:
        """A token-embedding or LM-head tensor: every input's rows re-indexed to the output
        vocabulary (``vocabulary=True``), so only the trailing dimensions must agree."""
        assert self.vocabulary is not None
        for label, info in infos.items():
            rows = self.vocabulary.model_rows.get(label, 0)
            if info.shape[1:] != reference.shape[1:] or info.shape[0] < rows:
                self._problem(
                    f"shape:{output}",
                    f"tensor '{info.name}' has shape {list(info.shape)} in model '{label}', which "
                    f"does not fit its {rows} token rows and the hidden size "
                    f"{list(reference.shape[1:])} of model '{reference_label(infos, reference)}'",
                )
        shape = (self.vocabulary.rows, *reference.shape[1:])
        return self._merge_job(output_slice, output, infos, names, t, reference, shape)

    def _merge_job(
        self,
        output_slice: _Slice,
        output: str,
        infos: Mapping[str, TensorInfo],
        names: Mapping[str, str],
        t: float,
        reference: TensorInfo,
        vocabulary_shape: tuple[int, ...] | None = None,
    ) -> TensorJob | None:
        """The job merging ``infos`` (or copying one of them) into ``output``."""
        donor = self._donor(output_slice)
        dtype = self.out_dtype or reference.dtype
        input_bytes = sum(i.nbytes for i in infos.values())
        kept = output_slice.base is not None and module_kind(output) in self.keep
        if kept and output_slice.base is not None and output_slice.base in infos:
            # keep_from_base: the base's tensor, unchanged
            job = _copy_job(output, output_slice.base, infos[output_slice.base], dtype)
            return _aligned(job, vocabulary_shape, infos)
        if reference.dtype not in FLOAT_CODES:  # integer buffers are copied from the base
            return _copy_job(output, donor, reference, reference.dtype)

        base_label = output_slice.base if self.method.base != "input" else None
        sources = [s for s in output_slice.sources if s.model != base_label]
        sources = [s for s in sources if s.model in infos]  # a missing one is a problem already
        inputs = tuple(TensorInput(s.model, infos[s.model].name) for s in sources)
        base = None
        if base_label is not None and base_label in infos:
            base = TensorInput(base_label, infos[base_label].name)
        per_model, params = self._parameters(output_slice, sources, names, output, t)
        job = TensorJob(
            output,
            vocabulary_shape or reference.shape,
            dtype,
            self.method.name,
            inputs,
            base,
            per_model,
            params,
            input_bytes,
            vocabulary_shape is not None,
        )
        if len(inputs) < self.method.min_models:
            self._problem(
                "few",
                f"{self.method.name} needs at least {self.method.min_models} models besides the base",
            )
        if self.method.max_models is not None and len(inputs) > self.method.max_models:
            self._problem(
                "many",
                f"{self.method.name} takes at most {self.method.max_models} models besides the "
                f"base, got {len(inputs)}",
            )
        if self.method.check is not None and (problem := self.method.check(per_model, params)):
            self._problem(f"param:check:{problem}", f"tensor '{output}': {problem}")
        return job

    def _head(self, output: str, names: Mapping[str, str]) -> TensorJob | None:
        """A task head: copied from heads.source, else merged only where every model agrees.

        Returns the copy job, or None with ``output`` added to ``left_out`` when the head is
        left out, or None when it is merged like any other tensor.
        """
        if self.heads_source is not None:
            info = self.checkpoints[self.heads_source].tensors.get(output)
            if info is None:
                self.left_out.append(output)
                return None
            return _copy_job(output, self.heads_source, info, self.out_dtype or info.dtype)
        infos = [self.checkpoints[label].tensors.get(name) for label, name in names.items()]
        if any(info is None for info in infos) or len({i.shape for i in infos if i}) > 1:
            self.left_out.append(output)
        return None

    def _parameters(
        self,
        output_slice: _Slice,
        sources: list[_Source],
        names: Mapping[str, str],
        output: str,
        t: float,
    ) -> tuple[dict[str, tuple[float, ...]], dict[str, Any]]:
        """Resolve every parameter of the method for one output tensor (MergeKit precedence)."""
        per_model: dict[str, tuple[float, ...]] = {}
        params: dict[str, Any] = {}

        def value(param: Param, own: Mapping[str, Any] | None, input_name: str) -> Any:
            levels = [own, output_slice.parameters, self.module, self.top]
            found = resolve_parameter(
                param.name,
                per_model=param.per_model,
                levels=levels,
                input_name=input_name,
                output_name=output,
                t=t,
            )
            return param.default if found is None else found

        for param in self.method.params:
            if not param.effect:
                continue
            if not param.per_model:
                params[param.name] = value(param, None, output)
                if params[param.name] is None:
                    self._problem(
                        f"param:{param.name}",
                        f"parameters: {self.method.name} needs '{param.name}' (tensor '{output}')",
                    )
                continue
            values = []
            for source in sources:
                name = names[source.model]
                found = value(param, source.parameters, name)
                if found is None:
                    self._problem(
                        f"param:{param.name}:{source.model}",
                        f"{source.where}: {self.method.name} needs '{param.name}' for model "
                        f"'{source.model}' (no value for tensor '{name}' at any level)",
                    )
                    found = 0.0
                values.append(float(found))
            per_model[param.name] = tuple(values)
        return per_model, params


def reference_label(infos: Mapping[str, TensorInfo], reference: TensorInfo) -> str:
    """The label of the model whose tensor is ``reference``."""
    return next(label for label, info in infos.items() if info is reference)


# Integer buffers some transformers versions save and others leave out (non-persistent):
# a model lacking one gets the donor's (Planner._buffer_job).
BUFFER_NAMES = frozenset({"position_ids", "token_type_ids"})


def _copy_job(output: str, model: str, info: TensorInfo, dtype: str) -> TensorJob:
    """A job that copies tensor ``info`` of ``model`` unchanged (but for ``dtype``)."""
    return TensorJob(
        output, info.shape, dtype, COPY, (TensorInput(model, info.name),), None, {}, {}, info.nbytes
    )


def _aligned(
    job: TensorJob, shape: tuple[int, ...] | None, infos: Mapping[str, TensorInfo]
) -> TensorJob:
    """The copy ``job`` reading its input re-indexed to the output vocabulary (``shape``), if
    given; every model of ``infos`` is read too, after the copied one, for the default rows of
    the tokens it lacks."""
    if shape is None:
        return job
    (kept,) = job.inputs
    others = [TensorInput(label, info.name) for label, info in infos.items() if label != kept.model]
    return dataclasses.replace(
        job,
        shape=shape,
        vocabulary=True,
        inputs=(kept, *others),
        input_bytes=sum(info.nbytes for info in infos.values()),
    )


def _tokenizer_config(
    config: dict[str, Any], tokenizer: OutputTokenizer, donor: str
) -> dict[str, Any]:
    """The output config with the vocabulary size and special-token ids of the output tokenizer."""
    from alloykit.io.tokenizer_files import remap_token_ids

    if tokenizer.vocabulary is None:
        return config
    config = copy.deepcopy(config)
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            for key in VOCAB_SIZE_KEYS:
                if isinstance(section.get(key), int):
                    section[key] = tokenizer.vocabulary.rows
    moves = tokenizer.id_moves(donor)
    return remap_token_ids(config, *moves) if moves is not None else config


def _empty_job(output: str) -> TensorJob:
    return TensorJob(output, (), "F32", COPY, (), None, {}, {}, 0)


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _torch_name(code: str) -> str:
    return str(SAFETENSORS_DTYPES[code]).removeprefix("torch.")


def _output_config(
    donor: Checkpoint, slices: list[_Slice], layers: int, jobs: list[TensorJob]
) -> dict[str, Any] | None:
    """The donor's config with the layer count (and per-layer lists) of the output."""
    if donor.config is None:
        return None
    config = dict(donor.config)
    donor_layers, key = layer_count(donor.config, donor.tensors)
    source_layers = [s.sources[0].start + k for s in slices for k in range(s.length)]
    # reordered layers of the same depth need their per-layer lists rebuilt too
    if key is not None and source_layers != list(range(donor_layers)):
        section, _, leaf = key.rpartition(".")
        target = dict(config[section]) if section else config
        target[leaf] = layers
        for list_key, value in list(target.items()):
            if (
                list_key != "architectures"
                and isinstance(value, list)
                and len(value) == donor_layers > 1
            ):
                target[list_key] = [value[i] for i in source_layers]
        if section:
            config[section] = target
    if config.get("tie_word_embeddings") and any(j.output in HEAD_NAMES for j in jobs):
        config["tie_word_embeddings"] = False  # the output stores its own head
    return config
