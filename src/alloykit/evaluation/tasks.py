"""Task files: the YAML schema, reading local JSONL/CSV data, and rendering prompts.

A task file names its data (one file, or one per split), a Jinja prompt template, the target
(a column or a template) and a metric. Loading checks everything that can be checked without a
model: required fields per metric, every template variable against the data's columns, empty
files, targets that are not among the choices. docs/evaluate.md describes the format.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alloykit.config import read_yaml_mapping
from alloykit.errors import TaskError

SPLITS = ("train", "validation", "test")
MetricKind = Literal[
    "exact_match", "multiple_choice", "perplexity", "bits_per_byte", "classification"
]
# the score each metric reports first, and whether a lower value is better
PRIMARY: dict[str, tuple[str, bool]] = {
    "exact_match": ("exact_match", False),
    "multiple_choice": ("acc", False),
    "perplexity": ("perplexity", True),
    "bits_per_byte": ("bits_per_byte", True),
    "classification": ("acc", False),
}


class Normalize(BaseModel):
    """How predictions and targets are normalised before exact matching."""

    model_config = ConfigDict(extra="forbid")
    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_whitespace: bool = False  # remove all whitespace (surrounding space is always stripped)
    regexes_to_ignore: list[str] = Field(default_factory=list)


class MetricSpec(BaseModel):
    """The metric and its options (``metric: exact_match`` is short for ``{kind: exact_match}``)."""

    model_config = ConfigDict(extra="forbid")
    kind: MetricKind
    normalize: Normalize = Field(default_factory=Normalize)
    extract: str | None = None  # regex applied to the prediction; group 1 (or the match) is kept
    extract_match: Literal["first", "last"] = "first"


class Generation(BaseModel):
    """Greedy generation settings of ``exact_match`` tasks."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    stop: list[str] = Field(default_factory=lambda: ["\n\n"])


class TaskSpec(BaseModel):
    """A task file, as written (see docs/evaluate.md)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    data: str | dict[Literal["train", "validation", "test"], str]
    split: Literal["train", "validation", "test"] | None = None
    prompt: str
    target: str | None = None
    choices: str | list[str] | None = None
    answer_prefix: str = " "
    fewshot: int = Field(0, ge=0)
    fewshot_separator: str = "\n\n"
    chat_template: bool = False
    system_prompt: str | None = None
    limit: int | None = Field(None, ge=1)
    shuffle: bool = False
    seed: int = 0
    metric: MetricSpec
    generation: Generation = Field(default_factory=Generation)
    head: str | None = None
    labels: list[str] | None = None
    finetune: str | None = None

    @field_validator("metric", mode="before")
    @classmethod
    def _short_metric(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class Example:
    """One evaluation item, rendered.

    ``shots`` are the few-shot (prompt, answer) pairs before ``query``; ``targets`` are the
    accepted answers (exact match); ``choices`` the continuations scored (multiple choice, each
    with the answer prefix); ``label`` the index of the right choice or class; ``text`` the
    document of perplexity tasks.
    """

    query: str
    shots: tuple[tuple[str, str], ...] = ()
    targets: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    label: int | None = None


@dataclass(frozen=True)
class Task:
    """A loaded task: its spec, where it came from and its rendered examples."""

    name: str
    path: Path
    spec: TaskSpec
    examples: tuple[Example, ...]
    head: str | None = None  # resolved head model reference (classification)
    finetune: str | None = None  # resolved own fine-tune reference, for normalised scores

    @property
    def kind(self) -> str:
        return self.spec.metric.kind

    @property
    def primary(self) -> str:
        """The score reported first (``acc``, ``exact_match``, ``perplexity``, ...)."""
        return PRIMARY[self.kind][0]

    @property
    def lower_is_better(self) -> bool:
        return PRIMARY[self.kind][1]


# --------------------------------------------------------------------------- loading


def load_task(path: str | Path, *, split: str | None = None) -> Task:
    """Read, validate and render a task file; every row of its evaluated split becomes an Example.

    ``split`` overrides the file's ``split`` (recipe search scores ``validation``); then only
    that split and ``train`` (for few-shot examples) are read, so other splits stay unseen.

    Raises :class:`TaskError` naming the file and field for any problem.

    Example:
        >>> task = load_task("src/alloykit/examples/next_word.yml")  # doctest: +SKIP
        >>> task.kind, len(task.examples)  # doctest: +SKIP
        ('multiple_choice', 12)
    """
    path = Path(path)
    where = f"task file '{path}'"
    raw = read_yaml_mapping(path, where, TaskError, "data, prompt and metric")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = ".".join(str(p) for p in error["loc"])
            message = "missing" if error["type"] == "missing" else error["msg"]
            problems.append(f"{field}: {message}")
        raise TaskError(f"{where}: " + "; ".join(problems)) from e
    name = spec.name or path.stem
    _check_fields(spec, where)
    folder = path.parent
    data = {"test": spec.data} if isinstance(spec.data, str) else spec.data
    files = {str(split): name for split, name in data.items()}
    chosen = split
    split = split or spec.split or next(s for s in ("test", "validation", "train") if s in files)
    if split not in files:
        raise TaskError(f"{where}: split '{split}' has no file under data ({', '.join(files)})")
    if chosen is not None:  # read only what is scored and where shots come from
        files = {s: f for s, f in files.items() if s in (split, "train")}
    rows = {s: read_rows(_local(folder, f)) for s, f in files.items()}
    if spec.fewshot and "train" not in rows:
        raise TaskError(f"{where}: fewshot: {spec.fewshot} needs a train split under data")
    for s, table in rows.items():
        _check_columns(spec, where, _local(folder, files[s]), table)
    evaluated = list(rows[split])
    if spec.shuffle:
        random.Random(spec.seed).shuffle(evaluated)
    if spec.limit is not None:
        evaluated = evaluated[: spec.limit]
    head = _reference(folder, spec.head)
    finetune = _reference(folder, spec.finetune) or head
    renderer = _Renderer(spec, where)
    pool = rows.get("train", [])
    rng = random.Random(spec.seed)
    examples = []
    for number, row in enumerate(evaluated):
        candidates = [r for r in pool if r != row]  # never the evaluated row as its own shot
        shots = rng.sample(candidates, min(spec.fewshot, len(candidates))) if spec.fewshot else []
        examples.append(renderer.example(row, number, [renderer.shot(r) for r in shots]))
    return Task(name, path, spec, tuple(examples), head, finetune)


def _local(folder: Path, name: str) -> Path:
    file = Path(name).expanduser()
    return file if file.is_absolute() else folder / file


def _reference(folder: Path, reference: str | None) -> str | None:
    """A model reference relative to the task file when such a folder exists, else as written."""
    if reference is None:
        return None
    local = _local(folder, reference)
    return str(local) if local.exists() else reference


def _check_fields(spec: TaskSpec, where: str) -> None:
    kind = spec.metric.kind
    needed = {
        "exact_match": ["target"],
        "multiple_choice": ["target", "choices"],
        "classification": ["target", "head"],
    }.get(kind, [])
    missing = [f for f in needed if getattr(spec, f) is None]
    if missing:
        raise TaskError(f"{where}: metric {kind} needs field {', '.join(missing)}")
    if spec.chat_template and kind in ("perplexity", "bits_per_byte", "classification"):
        raise TaskError(f"{where}: chat_template applies to generation and multiple_choice tasks")


def read_rows(file: Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` (one JSON object a line) or ``.csv`` (with a header) file."""
    if not file.is_file():
        raise TaskError(f"data file '{file}' does not exist")
    if file.suffix not in (".jsonl", ".csv"):
        raise TaskError(f"data file '{file}': use a .jsonl or .csv file")
    rows: list[dict[str, Any]] = []
    with file.open(newline="", encoding="utf-8") as handle:
        if file.suffix == ".csv":
            rows = [dict(row) for row in csv.DictReader(handle)]
        else:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"data file '{file}', line {number}: not JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise TaskError(f"data file '{file}', line {number}: not a JSON object")
                rows.append(row)
    if not rows:
        raise TaskError(f"data file '{file}' has no rows")
    return rows


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def _template_columns(template: str, where: str, field: str) -> set[str]:
    from jinja2 import TemplateSyntaxError, meta

    try:
        return set(meta.find_undeclared_variables(_environment().parse(template)))
    except TemplateSyntaxError as e:
        raise TaskError(
            f"{where}: {field} {template!r} is not a valid template: {e.message}"
        ) from e


def _check_columns(spec: TaskSpec, where: str, file: Path, rows: list[dict[str, Any]]) -> None:
    """Every column a template or field names exists in the data file."""
    columns = set(rows[0])
    uses: list[tuple[str, set[str]]] = [("prompt", _template_columns(spec.prompt, where, "prompt"))]
    for field in ("target", "choices"):
        value = getattr(spec, field)
        if value is None:
            continue
        for text in value if isinstance(value, list) else [value]:
            if _is_template(text):
                uses.append((field, _template_columns(text, where, field)))
            elif not isinstance(value, list):  # a column name (a literal choice names none)
                uses.append((field, {text}))
    for field, names in uses:
        for column in sorted(names - columns):
            raise TaskError(
                f"{where}: {field} uses column '{column}', which data file '{file}' does not "
                f"have (columns: {', '.join(sorted(columns))})"
            )


class _Renderer:
    """Renders a task's templates for one row at a time."""

    def __init__(self, spec: TaskSpec, where: str) -> None:
        self.spec = spec
        self.where = where
        self.environment = _environment()

    def _render(self, template: str, row: dict[str, Any], field: str, number: int) -> Any:
        from jinja2 import UndefinedError

        try:
            return self.environment.from_string(template).render(**row)
        except UndefinedError as e:
            raise TaskError(f"{self.where}: {field}, row {number}: {e.message}") from e

    def _value(self, text: str, row: dict[str, Any], field: str, number: int) -> Any:
        """A field given as a column name (the raw value) or a template (rendered text)."""
        if _is_template(text):
            return self._render(text, row, field, number)
        if text not in row:
            raise TaskError(f"{self.where}: {field}, row {number}: no column '{text}'")
        return row[text]

    def query(self, row: dict[str, Any], number: int) -> str:
        return str(self._render(self.spec.prompt, row, "prompt", number))

    def choices(self, row: dict[str, Any], number: int) -> list[str]:
        spec_choices = self.spec.choices
        if isinstance(spec_choices, list):
            # each entry is a template; plain text such as "yes" renders to itself
            return [str(self._render(c, row, "choices", number)) for c in spec_choices]
        assert spec_choices is not None
        value = self._value(spec_choices, row, "choices", number)
        if isinstance(value, str) and value.startswith("["):
            with contextlib.suppress(json.JSONDecodeError):  # a JSON list in a CSV cell
                value = json.loads(value)
        if not isinstance(value, list) or not value:
            raise TaskError(
                f"{self.where}: choices, row {number}: expected a non-empty list, got {value!r}"
            )
        return [str(v) for v in value]

    def targets(self, row: dict[str, Any], number: int) -> list[str]:
        assert self.spec.target is not None
        value = self._value(self.spec.target, row, "target", number)
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    def label(self, row: dict[str, Any], number: int, names: list[str]) -> int:
        assert self.spec.target is not None
        value = self._value(self.spec.target, row, "target", number)
        return label_index(value, names, f"{self.where}: target, row {number}")

    def shot(self, row: dict[str, Any]) -> tuple[str, str]:
        """A few-shot example: its prompt and its answer (target, or the right choice)."""
        query = self.query(row, -1)
        if self.spec.metric.kind == "multiple_choice":
            choices = self.choices(row, -1)
            return query, self.spec.answer_prefix + choices[self.label(row, -1, choices)]
        if self.spec.target is None:
            return query, ""
        return query, self.spec.answer_prefix + self.targets(row, -1)[0]

    def example(self, row: dict[str, Any], number: int, shots: list[tuple[str, str]]) -> Example:
        kind = self.spec.metric.kind
        query = self.query(row, number)
        if kind == "multiple_choice":
            choices = self.choices(row, number)
            label = self.label(row, number, choices)
            prefixed = tuple(self.spec.answer_prefix + c for c in choices)
            return Example(query, tuple(shots), choices=prefixed, label=label)
        if kind == "exact_match":
            return Example(query, tuple(shots), targets=tuple(self.targets(row, number)))
        if kind == "classification":
            # labels are resolved against the head model later; keep the raw target for now
            return Example(query, tuple(shots), targets=tuple(self.targets(row, number)))
        return Example(query)


def label_index(value: Any, names: list[str], where: str) -> int:
    """A target as an index into ``names``: one of the names, an index, or a letter A, B, ..."""
    text = str(value).strip()
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    if len(text) == 1 and "A" <= text.upper() <= "Z" and ord(text.upper()) - 65 < len(names):
        return ord(text.upper()) - 65
    raise TaskError(f"{where}: {value!r} is neither an index, a letter nor one of {names}")


def context_text(task: Task, example: Example, chat_template: Any = None) -> str:
    """The text before the answer: few-shot examples and the query, or a chat conversation.

    ``chat_template`` is a callable ``messages -> text`` (the tokenizer's chat template) used when
    the task sets ``chat_template: true``.
    """
    spec = task.spec
    if not spec.chat_template:
        parts = [query + answer for query, answer in example.shots]
        system = [spec.system_prompt] if spec.system_prompt else []
        return spec.fewshot_separator.join([*system, *parts, example.query])
    if chat_template is None:
        raise TaskError(f"task '{task.name}': chat_template is true but the tokenizer has none")
    messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    for query, answer in example.shots:
        messages.append({"role": "user", "content": query})
        messages.append({"role": "assistant", "content": answer.strip()})
    messages.append({"role": "user", "content": example.query})
    return str(chat_template(messages))
