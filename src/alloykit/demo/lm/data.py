"""Skill data for the causal-LM protocol: DeepMind's mathematics-dataset questions with answers.

Saxton et al., 2019, "Analysing Mathematical Reasoning Abilities of Neural Models"
(arXiv:1904.01557) ship the generator as the PyPI package ``mathematics-dataset``. Each skill is
one module (``arithmetic__add_or_sub``, ``comparison__pair``, ...); its questions are generated
with a fixed seed at the "train-easy" difficulty, deduplicated, and split into train /
validation / test so that no question appears in two splits. The same installed packages and
seed always give the same rows; nothing is downloaded.

The splits are written as JSONL files (``{"question": ..., "answer": ...}``) with one
alloykit task file per (module, split), scored by exact match of a greedy answer
(docs/evaluate.md), so experts and merges are scored by :func:`alloykit.evaluate`.
"""

from __future__ import annotations

import importlib
import json
import random
import sys
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alloykit.demo.data import DemoDataError, _package_dir

# The prompt every model sees (tasks and fine-tuning alike); the answer follows after a space.
PROMPT = "Question: {question}\nAnswer:"
ANSWER_PREFIX = " "
STOP = "\n"
SPLIT_NAMES = ("train", "validation", "test")
# Three skills of different families (algebra__linear_1d, numbers__round_number, ... also work).
DEFAULT_MODULES = ("arithmetic__add_or_sub", "comparison__pair", "numbers__place_value")


@dataclass(frozen=True)
class QA:
    """One generated question and its answer, as text."""

    question: str
    answer: str


@dataclass
class Skill:
    """One module's rows, split three ways."""

    module: str
    train: list[QA] = field(default_factory=list)
    validation: list[QA] = field(default_factory=list)
    test: list[QA] = field(default_factory=list)

    def split(self, name: str) -> list[QA]:
        """The rows of split ``name`` (train, validation or test)."""
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def patch_sympy() -> None:
    """Make mathematics-dataset importable with current sympy.

    The generator imports ``base_solution_linear`` from ``sympy.solvers.diophantine``; sympy
    1.6 and later define it in ``sympy.solvers.diophantine.diophantine`` only. Re-export it
    from the package (idempotent; a no-op on an old sympy that still has it).
    """
    outer = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(outer, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        outer.base_solution_linear = inner.base_solution_linear  # type: ignore[attr-defined]


def _generators() -> dict[str, Callable[[], object]]:
    """Every train-easy generator by ``family__module`` name."""
    _package_dir("mathematics_dataset", "mathematics-dataset")
    patch_sympy()
    warnings.filterwarnings("ignore", category=FutureWarning, module="mathematics_dataset")
    from mathematics_dataset import generate
    from mathematics_dataset.modules import modules

    # generate.py's "train-easy": the lowest third of each module's entropy range
    entropy = generate._make_entropy_fn(0, 3)
    return {
        f"{family}__{name}": maker
        for family, makers in modules.train(entropy).items()
        for name, maker in makers.items()
    }


def generate_rows(module: str, count: int, seed: int) -> list[QA]:
    """``count`` distinct questions of ``module`` (``family__module``), generated with ``seed``.

    The generator draws from NumPy's and Python's global random states, which are seeded here
    (and restored afterwards) so the rows depend on ``seed`` alone.
    """
    import numpy as np

    makers = _generators()
    if module not in makers:
        raise DemoDataError(
            f"mathematics-dataset has no module '{module}'; one of e.g. "
            + ", ".join(sorted(makers)[:6])
        )
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        rows: dict[str, QA] = {}
        for _ in range(count * 20):
            problem = makers[module]()
            question = str(problem.question).strip()  # type: ignore[attr-defined]
            answer = str(problem.answer).strip()  # type: ignore[attr-defined]
            rows.setdefault(question, QA(question, answer))
            if len(rows) == count:
                break
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    if len(rows) < count:
        raise DemoDataError(
            f"module '{module}' gave only {len(rows)} distinct questions of {count}; ask for fewer"
        )
    return list(rows.values())


def split_rows(module: str, rows: Sequence[QA], sizes: tuple[int, int, int], seed: int) -> Skill:
    """``rows`` shuffled with ``seed`` and cut into train/validation/test of ``sizes``.

    Rows are distinct questions, so the splits share no question.
    """
    if sum(sizes) > len(rows):
        raise DemoDataError(f"module '{module}': {sum(sizes)} rows asked for, {len(rows)} given")
    order = sorted(rows, key=lambda row: row.question)
    random.Random(seed).shuffle(order)
    n_train, n_val, n_test = sizes
    return Skill(
        module,
        order[:n_train],
        order[n_train : n_train + n_val],
        order[n_train + n_val : n_train + n_val + n_test],
    )


def module_seed(seed: int, module: str) -> int:
    """The generator seed of ``module``'s rows: ``seed`` and a CRC-32 of the module's name
    (stable across processes and Python versions, unlike ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % 2**32


def build_skills(
    modules: Sequence[str] = DEFAULT_MODULES,
    sizes: tuple[int, int, int] = (2000, 100, 200),
    seed: int = 0,
) -> list[Skill]:
    """One :class:`Skill` per module, each generated with a seed made of ``seed`` and the
    module's name (:func:`module_seed`): a module's rows do not depend on which other modules
    are asked for, or in what order."""
    skills = []
    for module in modules:
        rows = generate_rows(module, sum(sizes), module_seed(seed, module))
        skills.append(split_rows(module, rows, sizes, seed))
    return skills


def write_tasks(
    skills: Sequence[Skill], folder: Path, max_new_tokens: int = 16, fewshot: int = 0
) -> dict:
    """Write each skill's splits as JSONL and one exact-match task file per (module, split).

    Returns ``{module: {split: task file path}}``. Task names are ``module`` for the test split
    and ``module@split`` otherwise. With ``fewshot`` > 0 the task files
    (``module.split.Nshot.yml``) put that many solved training questions before each prompt
    (the same names: score one set at a time).
    """
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {}
    for skill in skills:
        out[skill.module] = {}
        for split in SPLIT_NAMES:
            data = folder / f"{skill.module}.{split}.jsonl"
            lines = [
                json.dumps({"question": r.question, "answer": r.answer}) for r in skill.split(split)
            ]
            data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        for split in SPLIT_NAMES:
            sources = {split: f"{skill.module}.{split}.jsonl"}
            if fewshot:  # shots come from the training questions, never the scored split
                sources["train"] = f"{skill.module}.train.jsonl"
            spec: dict = {
                "name": skill.module if split == "test" else f"{skill.module}@{split}",
                "data": sources,
                "split": split,
                "prompt": PROMPT.replace("{question}", "{{ question }}"),
                "target": "answer",
                "answer_prefix": ANSWER_PREFIX,
                "metric": {"kind": "exact_match"},
                "generation": {"max_new_tokens": max_new_tokens, "stop": [STOP]},
            }
            if fewshot:
                spec["fewshot"] = fewshot
            suffix = f".{fewshot}shot" if fewshot else ""
            task = folder / f"{skill.module}.{split}{suffix}.yml"
            task.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
            out[skill.module][split] = task
    return out


def training_text(row: QA) -> tuple[str, str]:
    """The (prompt, completion) a model is fine-tuned on: the task's prompt, then the answer
    and the stop string, so a greedy decode of a trained model stops after its answer."""
    return PROMPT.format(question=row.question), ANSWER_PREFIX + row.answer + STOP


def _main(argv: list[str]) -> None:  # pragma: no cover - a look at the rows by hand
    for skill in build_skills(argv or DEFAULT_MODULES, (5, 2, 2)):
        for row in skill.train:
            print(skill.module, repr(row.question), "->", repr(row.answer))


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1:])
