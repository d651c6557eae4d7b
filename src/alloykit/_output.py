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
    from alloykit.pipeline import MergeResult
    from alloykit.plan import MergePlan, TensorJob

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
    out.print(
        f"[bold]total:[/] {len(plan.jobs)} tensors, {plan.layers} layers, "
        f"{len(plan.models)} models, reads {human_bytes(plan.input_bytes)}, "
        f"writes {human_bytes(plan.output_bytes)} ({plan.output_dtype})"
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
