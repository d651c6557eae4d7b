"""All terminal output of the CLI: messages, warnings, errors, tables and the progress bar.

This is the one module that uses rich; everything else returns data or logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from alloykit.evaluation.compare import Comparison
    from alloykit.evaluation.score import Results
    from alloykit.pipeline import MergeResult
    from alloykit.plan import MergePlan, TensorJob
    from alloykit.rebasin.align import AlignResult

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        color = "yellow" if level == "warning" else "dim"
        err.print(f"[{color}]{level}:[/] {escape(record.getMessage())}")


def setup_logging(quiet: bool) -> None:
    """Route alloykit's log records to stderr as ``warning: ...`` lines."""
    logger = logging.getLogger("alloykit")
    logger.handlers[:] = [_WarningHandler()]
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False


def error(message: str) -> None:
    """One ``error: ...`` line on stderr."""
    err.print(f"[bold red]error:[/] {escape(message)}")


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KB`` (decimal units, as shard sizes are given)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def _model_names(plan: MergePlan) -> dict[str, str]:
    return {label: f"m{i}" for i, label in enumerate(plan.models)}


def print_plan(plan: MergePlan) -> None:
    """The plan as a table: output tensor, inputs, method, resolved parameters; then totals."""
    names = _model_names(plan)
    legend = Table(title="models", show_header=True, header_style="bold", box=None)
    legend.add_column("id")
    legend.add_column("model")
    legend.add_column("folder")
    for label, folder in plan.models.items():
        role = " (donor: config, tokenizer)" if label == plan.donor else ""
        legend.add_row(names[label], escape(label) + role, escape(str(folder)))
    out.print(legend)
    rows = [("output tensor", "inputs", "base", "method", "dtype", "parameters")]
    for job in plan.jobs:
        inputs = ",".join(
            names[i.model] + ("" if i.tensor == job.output else f":{i.tensor}") for i in job.inputs
        )
        parameters = " ".join(
            f"{k}={_format_value(v)}" for k, v in {**job.per_model, **job.params}.items()
        )
        base = names[job.base.model] if job.base else "-"
        rows.append((job.output, inputs, base, job.method, job.dtype, parameters))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for number, row in enumerate(rows):  # plain aligned lines: readable piped, greppable
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        line = f"{line}  {row[5]}"
        out.print(f"[bold]{escape(line)}[/]" if number == 0 else escape(line))
    if plan.tokenizer is not None and plan.tokenizer.vocabulary is not None:
        out.print(escape(describe_vocabulary(plan)))
    out.print(
        f"[bold]total:[/] {len(plan.jobs)} tensors, {plan.layers} layers, "
        f"{len(plan.models)} models, reads {human_bytes(plan.input_bytes)}, "
        f"writes {human_bytes(plan.output_bytes)} ({plan.output_dtype})"
    )
    calibration = plan.calibration
    if calibration is not None and (plan.kernel.statistics or plan.aim):
        from alloykit.calibration import DEFAULT_CACHE

        measured = [f"{plan.kernel.statistics} per input model"] if plan.kernel.statistics else []
        if plan.aim is not None and plan.base_model is not None:
            measured.append(f"the base's activations for aim (strength {plan.aim.strength:g})")
        out.print(
            f"[bold]calibration:[/] {escape(calibration.data)}, {calibration.samples} × "
            f"{calibration.sequence_length} tokens; measures {' and '.join(measured)}, "
            f"cached in {escape(calibration.cache_dir or str(DEFAULT_CACHE))}"
        )


def describe_vocabulary(plan: MergePlan) -> str:
    """One line on the output vocabulary: source, size, rows, and how many tokens each model lacks."""
    assert plan.tokenizer is not None and plan.tokenizer.vocabulary is not None
    vocabulary = plan.tokenizer.vocabulary
    names = _model_names(plan)
    lacking = ", ".join(
        f"{names[label]} lacks {int((index < 0).sum())}"
        for label, index in vocabulary.index.items()
        if label in names
    )
    return (
        f"vocabulary: {vocabulary.source}, {vocabulary.size} tokens, {vocabulary.rows} rows "
        f"(tokenizer from {names.get(plan.tokenizer.owner, plan.tokenizer.owner)}; {lacking}; "
        f"missing rows: {vocabulary.missing_rows})"
    )


def print_result(result: MergeResult) -> None:
    """What was merged and where."""
    plan = result.plan
    out.print(
        f"[bold green]merged[/] {len(plan.jobs)} tensors of {len(plan.models)} models with "
        f"[bold]{plan.method}[/] in {result.seconds:.1f} s -> [bold]{escape(str(result.output))}[/]"
    )
    for label in plan.models:
        role = "base/donor" if label == plan.donor else "input"
        out.print(f"  {role:10s} {escape(label)}")
    out.print(
        f"  wrote {human_bytes(plan.output_bytes)} ({plan.output_dtype}): "
        f"{escape(', '.join(result.files))}"
    )
    out.print(f"  recipe hash {result.recipe_hash[:16]}")


def print_summary(lines: list[str], *written: Path | None) -> None:
    """An inspection's sentences (indented lines continue the one above), then files written."""
    for line in lines:
        out.print(escape(line) if line.startswith(" ") else f"[bold]-[/] {escape(line)}")
    for path in written:
        if path is not None:
            out.print(f"wrote {escape(str(path))}")


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON, replacing ``path`` only once it is complete."""
    import json

    from alloykit.io.writer import write_text_atomically

    write_text_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class MergeProgress:
    """A progress bar over a merge: tensors done, bytes read, rate, time left.

    Pass :meth:`start` as ``merge(on_plan=...)`` and :meth:`advance` as ``progress=...``;
    use as a context manager so the bar is closed on errors too.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._done = 0

    def __enter__(self) -> MergeProgress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._progress is not None:
            if exc_type is not None:  # leave only the error line behind
                self._progress.live.transient = True
            self._progress.stop()

    def start(self, plan: MergePlan) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("merging"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[jobs]} tensors"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
        )
        self._progress.start()
        total = max(plan.input_bytes, 1)
        self._task = self._progress.add_task("merge", total=total, done=0, jobs=len(plan.jobs))

    def advance(self, job: TensorJob) -> None:
        if self._progress is None:
            return
        self._done += 1
        self._progress.update(self._task, advance=job.input_bytes, done=self._done)


def print_rows(rows: list[tuple[str, ...]]) -> None:
    """Aligned plain lines (readable piped, greppable); the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for number, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        line = "  ".join([*cells, row[-1]])
        out.print(f"[bold]{escape(line)}[/]" if number == 0 else escape(line))


def _score(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def print_results(results: Results) -> None:
    """One model's scores: a row per task, the primary score first, then the others."""
    table = Table(box=None, header_style="bold", title=escape(results.model))
    for column in ("task", "metric", "score", "other scores", "n"):
        table.add_column(column, justify="right" if column in ("score", "n") else "left")
    for result in results.tasks.values():
        others = "  ".join(
            f"{k}={_score(v)}" for k, v in result.scores.items() if k != result.primary
        )
        arrow = " (lower is better)" if result.lower_is_better else ""
        table.add_row(
            escape(result.task),
            f"{result.primary}{arrow}",
            _score(result.value),
            escape(others),
            str(result.n),
        )
    out.print(table)
    digest = f"recipe hash {results.recipe_hash[:16]}, " if results.recipe_hash else ""
    out.print(f"  {digest}{results.seconds:.1f} s")


def print_comparison(comparison: Comparison) -> None:
    """Models as rows, tasks as columns (primary score, and normalised score when known)."""
    table = Table(box=None, header_style="bold")
    table.add_column("model")
    for task in comparison.tasks:
        table.add_column(escape(task), justify="right")
    normalising = bool(comparison.references)
    if normalising:
        table.add_column("mean normalised", justify="right")
    for label, result in zip(comparison.models, comparison.results, strict=True):
        cells = []
        for task in comparison.tasks:
            cell = _score(result.tasks[task].value)
            ratio = comparison.normalised[label][task]
            cells.append(cell + (f" ({ratio:.3f})" if ratio is not None else ""))
        if normalising:
            cells.append(_score(comparison.mean_normalised[label]))
        table.add_row(escape(label), *cells)
    out.print(table)
    if normalising:
        references = ", ".join(f"{t} ÷ {r}" for t, r in comparison.references.items())
        out.print(f"  (normalised: {escape(references)}; 1.0 = as good as the fine-tune)")


class EvalProgress:
    """A progress bar per task: items scored, rate, time left (implements ProgressHook)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> EvalProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, label: str, total: int) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(escape(label), total=total)

    def advance(self, count: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=count)


def print_alignment(result: AlignResult) -> None:
    """What ``alloykit align`` found and wrote: groups, convergence, distances, output."""
    state = "converged" if result.converged else "stopped at --max-iter"
    out.print(
        f"aligned {len(result.spec.sizes)} permutation groups over {len(result.spec.axes)} "
        f"tensors: {state} after {result.rounds} rounds"
    )
    what = "weight distance" if result.models == 2 else "mean weight distance to the mean"
    out.print(f"{what} {result.distance_before:.4g} -> {result.distance_after:.4g}")
    for note in result.spec.notes:
        err.print(f"[dim]note:[/] {escape(note)}")
    for step in result.calibrated:
        out.print(f"calibrated: {escape(step)}")
    out.print(f"wrote {escape(str(result.output))} ({', '.join(result.files)})")
