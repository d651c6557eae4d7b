"""Text-classification tasks built from labelled text that ships inside PyPI packages.

Every task is a list of ``(text, label index)`` rows split into train / validation / test with
a fixed seed, so the same installed packages always give the same splits. Nothing is
downloaded: the rows come from files inside installed packages.

- ``trivia``: a Red-Trivia question -> its trivia list (``pip install Red-Trivia``).
- ``chat_topic``: a chatterbot-corpus English utterance -> its topic file
  (``pip install chatterbot-corpus``).
- ``math``: a generated mathematics-dataset question -> its module family
  (``pip install mathematics-dataset``).
- ``language``: a chatterbot-corpus utterance -> its language.
"""

from __future__ import annotations

import importlib
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alloykit.errors import AlloyError


class DemoDataError(AlloyError):
    """A package the demo's data comes from is missing or holds too little data."""


Row = tuple[str, int]


@dataclass
class Task:
    """One text-classification task: label names and the three splits."""

    name: str
    labels: list[str]
    train: list[Row] = field(default_factory=list)
    validation: list[Row] = field(default_factory=list)
    test: list[Row] = field(default_factory=list)

    def split(self, name: str) -> list[Row]:
        """The rows of split ``name`` (train, validation or test)."""
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def make_task(
    name: str,
    by_label: dict[str, list[str]],
    seed: int,
    per_label: int,
    fractions: tuple[float, float] = (0.6, 0.2),
) -> Task:
    """A task from ``{label: texts}``: deduplicated, at most ``per_label`` texts per label,
    split per label (stratified) into train/validation/test with ``fractions`` for the first two."""
    rng = random.Random(seed)
    labels = sorted(by_label)
    task = Task(name, labels)
    seen: set[str] = set()
    for index, label in enumerate(labels):
        texts = []
        for text in sorted(set(by_label[label])):
            key = text.strip().lower()
            if key and key not in seen:
                seen.add(key)
                texts.append(text.strip())
        rng.shuffle(texts)
        texts = texts[:per_label]
        n_train = int(len(texts) * fractions[0])
        n_val = int(len(texts) * fractions[1])
        task.train += [(t, index) for t in texts[:n_train]]
        task.validation += [(t, index) for t in texts[n_train : n_train + n_val]]
        task.test += [(t, index) for t in texts[n_train + n_val :]]
    for rows in (task.train, task.validation, task.test):
        rng.shuffle(rows)
    return task


def _package_dir(module: str, pip_name: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise DemoDataError(
            f"the demo needs the {pip_name} package: pip install 'alloykit[demo]'"
        ) from None
    paths = list(getattr(mod, "__path__", []))
    if not paths:
        raise DemoDataError(f"cannot find the files of package {pip_name}")
    return Path(paths[0])


TRIVIA_LISTS = (
    "anime",
    "artandliterature",
    "disney",
    "entertainment",
    "finalfantasy",
    "leagueoflegends",
    "pokemon",
    "starwars",
)


def trivia_texts(lists: Sequence[str] = TRIVIA_LISTS) -> dict[str, list[str]]:
    """Red-Trivia questions by list name."""
    folder = _package_dir("redbot.ext.trivia", "Red-Trivia") / "lists"
    out: dict[str, list[str]] = {}
    for name in lists:
        data = yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
        out[name] = [str(q) for q in data if str(q) not in ("AUTHOR", "CONFIG")]
    return out


def _chatterbot_utterances(language: str) -> dict[str, list[str]]:
    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / language
    out: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        texts = [
            str(u) for conv in data.get("conversations") or [] for u in conv if isinstance(u, str)
        ]
        out[path.stem] = texts
    return out


CHAT_TOPICS = (
    "ai",
    "botprofile",
    "computers",
    "emotion",
    "food",
    "history",
    "psychology",
    "science",
)


def chat_topic_texts(topics: Sequence[str] = CHAT_TOPICS) -> dict[str, list[str]]:
    """chatterbot-corpus English utterances (both turns) by topic file."""
    every = _chatterbot_utterances("english")
    return {t: every[t] for t in topics}


LANGUAGES = ("english", "french", "german", "italian", "portuguese", "spanish")


def language_texts(languages: Sequence[str] = LANGUAGES) -> dict[str, list[str]]:
    """chatterbot-corpus utterances by language (every topic together)."""
    return {
        lang: [t for texts in _chatterbot_utterances(lang).values() for t in texts]
        for lang in languages
    }


def _patch_sympy() -> None:
    # mathematics-dataset imports base_solution_linear from sympy.solvers.diophantine, which
    # newer sympy keeps in sympy.solvers.diophantine.diophantine.
    inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
    outer = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(outer, "base_solution_linear"):
        outer.base_solution_linear = inner.base_solution_linear  # type: ignore[attr-defined]


MATH_FAMILIES = (
    "algebra",
    "arithmetic",
    "comparison",
    "measurement",
    "numbers",
    "polynomials",
    "probability",
)


def math_texts(
    seed: int, per_family: int, families: Sequence[str] = MATH_FAMILIES
) -> dict[str, list[str]]:
    """Generated mathematics-dataset questions by module family (generators that fail on this
    numpy/sympy are skipped)."""
    _package_dir("mathematics_dataset", "mathematics-dataset")
    _patch_sympy()
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore", category=FutureWarning, module="mathematics_dataset")
    from mathematics_dataset.modules import modules

    np.random.seed(seed)
    random.seed(seed)
    generators = modules.train(lambda _range: (3, 6))
    out: dict[str, list[str]] = {}
    for family in families:
        makers: list[Callable[[], object]] = list(generators[family].values())
        texts: set[str] = set()
        attempts = 0
        while len(texts) < per_family and attempts < per_family * 4:
            maker = makers[attempts % len(makers)]
            attempts += 1
            try:
                problem = maker()
            except Exception:  # a generator broken by a newer numpy/sympy
                continue
            texts.add(str(problem.question))  # type: ignore[attr-defined]
        if len(texts) >= per_family // 2:  # else every generator of the family failed
            out[family] = sorted(texts)
    if len(out) < 4:
        raise DemoDataError("mathematics-dataset generated too few questions on this numpy/sympy")
    return out


TASK_NAMES = ("trivia", "chat_topic", "math", "language")


def build_task(name: str, seed: int = 0, per_label: int = 200) -> Task:
    """Task ``name`` (one of :data:`TASK_NAMES`), at most ``per_label`` rows per label."""
    if name == "trivia":
        texts = trivia_texts()
    elif name == "chat_topic":
        texts = chat_topic_texts()
    elif name == "math":
        texts = math_texts(seed, per_label)
    elif name == "language":
        texts = language_texts()
    else:
        raise DemoDataError(f"unknown demo task {name!r}; one of {', '.join(TASK_NAMES)}")
    return make_task(name, texts, seed, per_label)
