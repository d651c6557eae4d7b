"""The errors alloykit raises on bad input.

Every user-facing failure is an :class:`AlloyError` raised once, where its cause is known,
with a message that names the file, tensor, model or config key and says what to do. The CLI
prints the message on one line and exits non-zero; library callers can catch the subclasses.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlloyError(Exception):
    """Base class of every error alloykit raises on bad input."""


class ConfigError(AlloyError):
    """The merge config is invalid; the message lists every problem with its YAML path."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class CheckpointError(AlloyError):
    """A model folder, repo id or weight file cannot be found or read."""


class CalibrationError(AlloyError):
    """Calibration data is missing or too short, or a model cannot run on it."""


class IncompatibleModels(AlloyError):
    """The input models cannot be merged together (architecture, tensor names or shapes)."""


class MergeError(AlloyError):
    """A merge produced an unusable result (for example non-finite values)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class TaskError(AlloyError):
    """An evaluation task file, its data or its head model is unusable."""
