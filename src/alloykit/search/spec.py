"""The search file: a merge config template, the space searched and the objective.

See docs/search.md for the format. :func:`load_search` checks everything before any model is
read: the template is a valid merge config at the low and high ends of every range, each task
file has a validation split, paths exist in the template. Relative paths (the template, its
models, the task files) are relative to the search file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alloykit.config import read_yaml_mapping
from alloykit.search.space import (
    Dimension,
    SearchError,
    Space,
    dimension_name,
    expand,
    parse_path,
)

OPTIMISERS = ("random", "tpe", "gp", "cmaes", "greedy_soup", "nsga2", "nsga3")
PARETO_OPTIMISERS = ("nsga2", "nsga3", "tpe", "random")  # optuna's multi-objective samplers


class DimensionSpec(BaseModel):
    """One entry of ``space:``."""

    model_config = ConfigDict(extra="forbid")
    param: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    integer: bool = False
    choices: list[Any] | None = None
    layers: int | None = Field(default=None, ge=2)
    filter: str | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> DimensionSpec:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if self.high <= self.low:
            raise ValueError(f"high {self.high} is not above low {self.low}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


class TaskObjective(BaseModel):
    """One task of the objective: its file, its weight and an optional constraint."""

    model_config = ConfigDict(extra="forbid")
    task: str
    weight: float = Field(default=1.0, gt=0)
    min_score: float | None = None
    max_score: float | None = None  # for lower-is-better metrics (perplexity)


class ObjectiveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskObjective] = Field(min_length=1)
    batch_size: int | None = Field(default=None, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    pareto: bool = False  # each task one objective: a Pareto front (search/pareto.py)


class OptimiserSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["random", "tpe", "gp", "cmaes", "greedy_soup", "nsga2", "nsga3"] = "tpe"
    budget: int = Field(default=30, ge=1)
    time_limit: float | None = Field(default=None, gt=0)
    seed: int = 0
    startup_trials: int = Field(
        default=8, ge=1
    )  # TPE and GP: random trials before the model is used
    popsize: int | None = Field(default=None, ge=2)  # CMA-ES population (default: cma's 4 + 3 ln d)
    sigma0: float = Field(default=0.25, gt=0)  # CMA-ES initial step, in the unit cube
    population: int = Field(default=10, ge=2)  # NSGA-II/III: candidates per generation


class LayerSource(BaseModel):
    """A ``layer_path.models`` entry given as a recipe: merged once, then its layers used."""

    model_config = ConfigDict(extra="forbid")
    recipe: str


class LayerPathSpec(BaseModel):
    """``layer_path:``: search the layer sequence of a passthrough merge (search/layer_path.py)."""

    model_config = ConfigDict(extra="forbid")
    models: list[str | LayerSource] = Field(min_length=1)
    repeats: int = Field(default=1, ge=1, le=8)


class SearchSpec(BaseModel):
    """A search file, as written."""

    model_config = ConfigDict(extra="forbid")
    template: str | dict[str, Any] = Field(default_factory=dict)
    layer_path: LayerPathSpec | None = None
    space: list[DimensionSpec] = Field(default_factory=list)
    objective: ObjectiveSpec
    optimiser: OptimiserSpec = OptimiserSpec()


@dataclass(frozen=True)
class Search:
    """A loaded search file: the space (with its template), the objective and the optimiser."""

    path: Path
    spec: SearchSpec
    space: Space
    task_files: tuple[Path, ...]

    @property
    def digest(self) -> str:
        """A hash of what the trials depend on (space, objective, optimiser but budget/time)."""
        data = self.spec.model_dump(mode="json")
        data["optimiser"].pop("budget")
        data["optimiser"].pop("time_limit")
        data["template"] = dict(self.space.template)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def load_search(path: str | Path) -> Search:
    """Read and check a search file; raises :class:`SearchError` naming the file and field."""
    path = Path(path)
    where = f"search file '{path}'"
    raw = read_yaml_mapping(path, where, SearchError, "template, space and objective")
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {'missing' if error['type'] == 'missing' else message}")
        raise SearchError(f"{where}: " + "; ".join(problems)) from e
    folder = path.parent
    template = _template(spec.template, folder, where)
    _check_pareto(spec, where)
    if spec.layer_path is not None:
        from alloykit.search.layer_path import layer_path_space

        space: Space = layer_path_space(spec, template, folder, where)
    else:
        if not spec.template:
            raise SearchError(f"{where}: template: missing (a merge config whose values to search)")
        space = Space(template, tuple(_dimensions(spec, template, where)))
        if not space.dimensions and spec.optimiser.name != "greedy_soup":
            raise SearchError(f"{where}: space: empty; name at least one parameter to search")
        _check_space(space, where)
    task_files = []
    for i, entry in enumerate(spec.objective.tasks):
        file = Path(entry.task)
        file = file if file.is_absolute() else folder / file
        if not file.is_file():
            raise SearchError(f"{where}: objective.tasks[{i}].task: '{entry.task}' does not exist")
        task_files.append(file)
    return Search(path, spec, space, tuple(task_files))


def _check_pareto(spec: SearchSpec, where: str) -> None:
    """A Pareto search needs two tasks and a multi-objective sampler; NSGA needs a Pareto
    search."""
    name = spec.optimiser.name
    if spec.objective.pareto:
        if name not in PARETO_OPTIMISERS:
            raise SearchError(
                f"{where}: optimiser.name: {name} is single-objective; objective.pareto: true "
                f"takes {', '.join(PARETO_OPTIMISERS)}"
            )
        if len(spec.objective.tasks) < 2:
            raise SearchError(
                f"{where}: objective.pareto: true needs two or more tasks (one objective each)"
            )
    elif name in ("nsga2", "nsga3"):
        raise SearchError(
            f"{where}: optimiser.name: {name} is multi-objective; set objective.pareto: true "
            "(or choose tpe, gp, cmaes or random)"
        )


def _template(value: str | dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """The template as plain data, with local model paths made relative to the search file."""
    from alloykit.config import read_documents

    if isinstance(value, str):
        file = Path(value) if Path(value).is_absolute() else folder / value
        if not file.is_file():
            raise SearchError(f"{where}: template: '{value}' does not exist")
        try:
            documents = read_documents(file)
        except Exception as e:
            raise SearchError(f"{where}: template: {e}") from e
        if len(documents) != 1:
            raise SearchError(f"{where}: template: '{value}' must hold one YAML document")
        data, base = documents[0], file.parent
    else:
        data, base = value, folder
    return _with_local_paths(data, base)


def _with_local_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Model references that are local folders, as absolute paths (repo ids are left alone)."""

    def fix(ref: Any) -> Any:
        if isinstance(ref, str) and "+" not in ref and (base / ref.split("@")[0]).exists():
            return str((base / ref).resolve())
        if isinstance(ref, dict) and "model" in ref:
            return {**ref, "model": fix(ref["model"])}
        return ref

    data = json.loads(json.dumps(data))  # a deep copy of plain data
    if "base_model" in data:
        data["base_model"] = fix(data["base_model"])
    groups = [data, *(data.get("modules") or {}).values()]
    for group in groups:
        for entry in group.get("models") or []:
            entry["model"] = fix(entry.get("model"))
        for output_slice in group.get("slices") or []:
            if "base_model" in output_slice:
                output_slice["base_model"] = fix(output_slice["base_model"])
            for source in output_slice.get("sources") or []:
                source["model"] = fix(source.get("model"))
    return data


def _dimensions(spec: SearchSpec, template: dict[str, Any], where: str) -> list[Dimension]:
    dimensions: list[Dimension] = []
    for i, entry in enumerate(spec.space):
        field = f"{where}: space[{i}].param"
        try:
            paths = expand(template, parse_path(entry.param))
        except ValueError as e:
            raise SearchError(f"{field}: {e}") from e
        for concrete in paths:
            points: list[int | None] = list(range(entry.layers)) if entry.layers else [None]
            for point in points:
                dimensions.append(
                    Dimension(
                        name=dimension_name(concrete, entry.filter, point),
                        path=concrete,
                        low=entry.low,
                        high=entry.high,
                        log=entry.log,
                        step=entry.step,
                        integer=entry.integer,
                        choices=tuple(entry.choices) if entry.choices is not None else None,
                        filter=entry.filter,
                        point=point,
                        points=entry.layers,
                    )
                )
    names = [d.name for d in dimensions]
    for name in names:
        if names.count(name) > 1:
            raise SearchError(f"{where}: space: '{name}' is searched twice")
    return dimensions


def _check_space(space: Space, where: str) -> None:
    """The template must be a valid merge config at both ends of every range."""
    from alloykit.config import load_config
    from alloykit.errors import ConfigError

    for end in (0.0, 1.0):
        params = space.from_unit([end] * len(space.dimensions))
        try:
            load_config(space.config(params))
        except ConfigError as e:
            side = "low" if end == 0.0 else "high"
            raise SearchError(f"{where}: the template with every {side} value: {e}") from e
