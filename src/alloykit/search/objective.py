"""The objective: tasks scored on their validation split, combined by weights, with constraints.

The search only ever sees validation data: task files are loaded with ``split="validation"``,
which reads the validation (and train, for few-shot examples) rows and nothing else. The test
split is read by :meth:`Objective.score_test`, which refuses a second call, so a search scores
it once, for its best candidate, at the end.

A candidate's score is the weighted mean of its task scores, lower-is-better metrics
(perplexity) negated so that higher is better everywhere. A task's ``min_score`` (or
``max_score`` for lower-is-better metrics) is a constraint: a candidate below it is infeasible,
is never reported as the best, and is shown to the optimiser as ``score − 1 − shortfall`` so
that it ranks below feasible candidates of accuracy-like tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alloykit.errors import TaskError
from alloykit.evaluation import EvalOptions, Task, evaluate
from alloykit.evaluation.tasks import load_task
from alloykit.search.space import SearchError
from alloykit.search.spec import Search


@dataclass(frozen=True)
class Outcome:
    """One candidate's scores on one split."""

    score: float  # weighted mean, higher is better
    tasks: dict[str, float]  # each task's primary score, as the metric reports it
    violation: float  # total shortfall below the constraints; 0 when feasible

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0

    @property
    def value(self) -> float:
        """What the optimiser maximises: the score, minus a penalty when infeasible."""
        return self.score if self.feasible else self.score - 1.0 - self.violation


@dataclass
class Objective:
    """Scores candidates (merge configs or state dicts) on the search's tasks."""

    search: Search
    options: EvalOptions
    validation: list[Task] = field(init=False)
    test_reads: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.validation = [self._load(file, "validation") for file in self.search.task_files]

    def _load(self, file: Path, split: str) -> Task:
        try:
            return load_task(file, split=split)
        except TaskError as e:
            if f"split '{split}' has no file" in str(e):
                raise SearchError(
                    f"task file '{file}': data has no {split} split; a search tunes on the "
                    "validation split and reports the test split once"
                ) from e
            raise

    def score(self, model: Any, *, like: str | Path | None = None) -> Outcome:
        """The validation outcome of ``model`` (a merge config, MergedState or state dict)."""
        return self._outcome(evaluate(model, self.validation, self.options, like=like))

    def has_test(self) -> list[bool]:
        """Which tasks have a test split (read from the file's ``data``, not its rows)."""
        return [self._has(file, "test") for file in self.search.task_files]

    @staticmethod
    def _has(file: Path, split: str) -> bool:
        import yaml

        data = (yaml.safe_load(file.read_text()) or {}).get("data")
        return isinstance(data, dict) and split in data

    def score_test(self, model: Any, *, like: str | Path | None = None) -> Outcome | None:
        """The test outcome of ``model``: may be called once; None when no task has a test split."""
        if self.test_reads:
            raise SearchError("the test split was already scored: it is scored once, at the end")
        self.test_reads += 1
        files = [f for f, has in zip(self.search.task_files, self.has_test(), strict=True) if has]
        if not files:
            return None
        tasks = [self._load(file, "test") for file in files]
        return self._outcome(evaluate(model, tasks, self.options, like=like), partial=True)

    def _outcome(self, results: Any, *, partial: bool = False) -> Outcome:
        total = weights = violation = 0.0
        scores: dict[str, float] = {}
        entries = {
            task.name: entry
            for task, entry in zip(self.validation, self.search.spec.objective.tasks, strict=True)
        }
        for name, result in results.tasks.items():
            entry = entries[name]
            value = float(result.value)
            scores[name] = value
            total += entry.weight * (-value if result.lower_is_better else value)
            weights += entry.weight
            if entry.min_score is not None and value < entry.min_score:
                violation += entry.min_score - value
            if entry.max_score is not None and value > entry.max_score:
                violation += value - entry.max_score
        if not partial and weights == 0:
            raise SearchError("the objective has no tasks")
        return Outcome(total / weights if weights else float("nan"), scores, violation)


def outcome_from(attrs: Mapping[str, Any]) -> Outcome:
    """An outcome stored in a trial's user attributes."""
    return Outcome(float(attrs["score"]), dict(attrs["tasks"]), float(attrs["violation"]))
