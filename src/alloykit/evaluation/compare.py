"""Several models on the same tasks: one table, scores normalised by each task's own fine-tune.

The normalised score of a model on a task is its score divided by the score of the task's own
fine-tune (the model the task file names in ``finetune``, or its classification ``head``), so 1.0
means "as good as the specialist"; for metrics where lower is better (perplexity) the ratio is
inverted, so higher is better everywhere. The mean of a model's normalised scores is the
one-number summary a merge is usually judged by.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alloykit.errors import AlloyError
from alloykit.evaluation.score import (
    EvalOptions,
    ProgressHook,
    Results,
    TaskSource,
    evaluate,
    get_task,
)


@dataclass(frozen=True)
class Comparison:
    """Results of several models; ``normalised[model][task]`` is None when the task has no
    reference fine-tune (or its reference scored 0)."""

    models: list[str]
    tasks: list[str]
    results: list[Results]
    references: dict[str, str]  # task -> the model (one of ``models``) it is normalised by
    normalised: dict[str, dict[str, float | None]]
    mean_normalised: dict[str, float | None]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def compare(
    models: Sequence[Any],
    tasks: Sequence[TaskSource],
    options: EvalOptions | None = None,
    *,
    finetunes: Mapping[str, str] | None = None,
    progress: ProgressHook | None = None,
) -> Comparison:
    """Evaluate every model on every task and normalise by each task's own fine-tune.

    ``finetunes`` maps task names to their fine-tune (overriding the task files); a fine-tune
    that is not among ``models`` is evaluated too and added as a row.

    Example:
        >>> table = compare(["base", "ft1", "merge.yml"], ["t1.yml"])  # doctest: +SKIP
        >>> table.mean_normalised["merge.yml"]  # doctest: +SKIP
        0.97
    """
    loaded = [get_task(t) for t in tasks]
    references: dict[str, str] = {}
    labels = [str(m) for m in models]
    for task in loaded:
        reference = (finetunes or {}).get(task.name) or task.finetune
        if reference is None:
            continue
        match = next((label for label in labels if _same_model(label, reference)), None)
        if match is None:
            labels.append(reference)
            match = reference
        references[task.name] = match
    unknown = sorted(set(finetunes or {}) - {t.name for t in loaded})
    if unknown:
        raise AlloyError(f"--finetune names task '{unknown[0]}', which no --task file defines")
    sources = list(models) + labels[len(models) :]
    results = [evaluate(model, loaded, options, progress=progress) for model in sources]
    by_label = dict(zip(labels, results, strict=True))
    normalised: dict[str, dict[str, float | None]] = {}
    for label, result in by_label.items():
        normalised[label] = {}
        for task in loaded:
            reference = references.get(task.name)
            normalised[label][task.name] = (
                None
                if reference is None
                else _ratio(
                    result.tasks[task.name].value,
                    by_label[reference].tasks[task.name].value,
                    task.lower_is_better,
                )
            )
    means: dict[str, float | None] = {}
    for label, row in normalised.items():
        values = [v for v in row.values() if v is not None]
        means[label] = sum(values) / len(values) if values else None
    return Comparison(labels, [t.name for t in loaded], results, references, normalised, means)


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    left, right = Path(a).expanduser(), Path(b).expanduser()
    return left.exists() and right.exists() and left.resolve() == right.resolve()


def _ratio(score: float, reference: float, lower_is_better: bool) -> float | None:
    numerator, denominator = (reference, score) if lower_is_better else (score, reference)
    return numerator / denominator if denominator else None


def bar_chart(comparison: Comparison, path: str | Path) -> Path:
    """A grouped bar chart (tasks on the x axis, one bar per model) written as a PNG.

    Bars are normalised scores where the task has a reference fine-tune, raw scores otherwise;
    the legend's last group is the mean normalised score. Needs matplotlib (extra ``plots``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise AlloyError("--plot needs matplotlib: pip install 'alloykit[plots]'") from e
    groups = list(comparison.tasks)
    has_mean = any(v is not None for v in comparison.mean_normalised.values())
    if has_mean:
        groups.append("mean (normalised)")
    width = 0.8 / max(len(comparison.models), 1)
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4))
    for index, (label, result) in enumerate(
        zip(comparison.models, comparison.results, strict=True)
    ):
        values = []
        for task in comparison.tasks:
            value = comparison.normalised[label][task]
            values.append(value if value is not None else result.tasks[task].value)
        if has_mean:
            values.append(comparison.mean_normalised[label] or 0.0)
        positions = [g + index * width - 0.4 + width / 2 for g in range(len(groups))]
        axes.bar(positions, values, width, label=Path(label).name or label)
    axes.set_xticks(range(len(groups)), [_axis_label(comparison, g) for g in groups])
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_ylabel("normalised score (raw without a fine-tune)")
    columns = min(len(comparison.models), 4)
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=columns)
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _axis_label(comparison: Comparison, group: str) -> str:
    if group in comparison.references:
        return f"{group}\n(÷ {Path(comparison.references[group]).name})"
    return group
