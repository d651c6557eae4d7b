"""Evaluation of models and merges on the user's tasks, in memory or on disk.

Modules: ``tasks`` (the task file format, data, templates), ``metrics`` (scores from outputs),
``runner`` (batched forward passes and generation), ``model`` (what is evaluated; the reusable
skeleton), ``score`` (the :func:`evaluate` verb), ``compare`` (several models side by side) and
``harness`` (lm-evaluation-harness tasks on a model in memory).

The package is called ``evaluation`` rather than ``evaluate`` so that ``alloykit.evaluate`` can
be the function.
"""

from __future__ import annotations

from alloykit.evaluation.score import EvalOptions, Results, TaskResult, evaluate
from alloykit.evaluation.tasks import Task, load_task

__all__ = ["EvalOptions", "Results", "Task", "TaskResult", "evaluate", "load_task"]
