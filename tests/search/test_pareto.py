"""Multi-objective search: two conflicting tasks give a front of non-dominated points."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alloykit.config import load_config
from alloykit.evaluation import EvalOptions
from alloykit.search import SearchError, SearchOptions, load_search
from alloykit.search.objective import Objective
from alloykit.search.pareto import pareto_front, run_pareto_search
from tests.search.problem import write_search

PARETO = "objective:\n  pareto: true\n  tasks:\n    - task: a.yml\n    - task: b.yml\n"


def _pareto_search(root: Path, optimiser: str, budget: int, name: str) -> Path:
    path = write_search(root, optimiser, budget, name=name)
    text = path.read_text().replace(
        "objective:\n  tasks:\n    - task: a.yml\n    - task: b.yml\n", PARETO
    )
    text = text.replace("seed: 0}", "seed: 0, population: 4}")
    path.write_text(text)
    return path


def _no_better(p: tuple[float, ...], q: tuple[float, ...]) -> bool:
    """Whether q dominates p (written out here, not taken from the module under test)."""
    return all(b >= a for a, b in zip(p, q, strict=True)) and any(
        b > a for a, b in zip(p, q, strict=True)
    )


def test_nsga2_on_two_conflicting_tasks_returns_non_dominated_points_only(problem: Path) -> None:
    search_file = _pareto_search(problem, "nsga2", 12, "pareto_nsga2.yml")
    out = problem / "pareto-nsga2"
    result = run_pareto_search(search_file, out, SearchOptions(threads=1))
    assert result.objectives == ["a", "b"]
    assert len(result.trials) == 12
    scored = [t for t in result.trials if t.outcome is not None and t.outcome.feasible]
    points = {t.slot: (t.outcome.tasks["a"], t.outcome.tasks["b"]) for t in scored if t.outcome}
    front = {t.slot for t in result.front}
    assert front
    for slot in front:  # no candidate of the whole search dominates a front point
        assert not any(_no_better(points[slot], q) for q in points.values())
    for slot, p in points.items():  # and every candidate off the front is dominated or a repeat
        if slot not in front:
            assert any(_no_better(p, points[f]) or p == points[f] for f in front)
    # the tasks conflict: the front holds a trade-off, not one point best at both
    best_a = max(p[0] for p in points.values())
    best_b = max(p[1] for p in points.values())
    assert (best_a, best_b) not in {points[s] for s in front}
    assert len(front) >= 2

    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert [int(r["trial"]) for r in rows] == sorted(front)
    assert (out / "pareto.png").is_file() and (out / "trials.csv").is_file()
    # each point's recipe is saved and merges to the scores reported for it
    from alloykit.pipeline import MergeOptions, merge_in_memory
    from alloykit.search.study import trial_seed

    objective = Objective(load_search(search_file), EvalOptions(threads=1))
    first = result.front[0]
    recipe = out / "pareto" / f"trial_{first.slot}.yml"
    merged = merge_in_memory(load_config(recipe), MergeOptions(seed=trial_seed(0, first.slot)))
    assert first.outcome is not None
    assert objective.score(merged).tasks == first.outcome.tasks
    assert sorted(p.name for p in (out / "pareto").iterdir()) == sorted(
        f"trial_{s}.yml" for s in front
    )


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 2)), max_size=12))
def test_pareto_front_matches_the_definition(points: list[tuple[int, int, int]]) -> None:
    front = pareto_front(points)
    for i, p in enumerate(points):
        dominated = any(_no_better(p, q) for q in points)
        repeat = p in points[:i]
        assert (i in front) == (not dominated and not repeat)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("pareto: true\n", ""), "nsga2 is multi-objective; set objective.pareto: true"),
        (("name: nsga2", "name: cmaes"), "cmaes is single-objective"),
        (("    - task: b.yml\n", ""), "needs two or more tasks"),
    ],
)
def test_bad_pareto_files_are_refused(problem: Path, change: tuple[str, str], message: str) -> None:
    path = _pareto_search(problem, "nsga2", 4, "pareto_bad.yml")
    path.write_text(path.read_text().replace(*change))
    with pytest.raises(SearchError, match=message):
        load_search(path)


def test_cli_prints_the_front_and_refuses_a_bad_file(
    problem: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from alloykit import cli

    search_file = _pareto_search(problem, "random", 4, "pareto_cli.yml")

    def run(*args: str | Path) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["alloykit", *map(str, args)])
        with pytest.raises(SystemExit) as exit:
            cli.main()
        captured = capsys.readouterr()
        return int(exit.value.code or 0), captured.out, captured.err

    code, stdout, stderr = run("search", search_file, problem / "pareto-cli", "-j", "1")
    assert code == 0, stderr
    assert "Pareto front" in stdout and stdout.count("  trial ") == 4
    assert (problem / "pareto-cli" / "pareto.csv").is_file()

    bad = problem / "pareto_cli_bad.yml"
    bad.write_text(search_file.read_text().replace("name: random", "name: cmaes"))
    code, stdout, stderr = run("search", bad, problem / "pareto-cli-bad")
    assert code != 0
    assert "single-objective" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (problem / "pareto-cli-bad").exists()


def test_kill_and_resume_gives_the_uninterrupted_front_and_reuses_the_cache(
    problem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alloykit.search.cache import CACHE_FOLDER, TaskVectorCache

    search_file = _pareto_search(problem, "nsga2", 8, "pareto_resume.yml")
    whole = run_pareto_search(search_file, problem / "pareto-whole", SearchOptions(threads=1))

    calls: list[int] = []
    score = Objective.score

    def killed(self: Objective, model: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the process dies in the middle of trial 5
        return score(self, model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Objective, "score", killed)
    out = problem / "pareto-killed"
    with pytest.raises(KeyboardInterrupt):
        run_pareto_search(search_file, out, SearchOptions(threads=1))
    assert (out / CACHE_FOLDER / "manifest.json").is_file()  # kept for --resume
    monkeypatch.setattr(Objective, "score", score)
    writes: list[int] = []
    write = TaskVectorCache._write

    def counted(self: TaskVectorCache, *args: object) -> None:
        writes.append(1)
        write(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(TaskVectorCache, "_write", counted)
    resumed = run_pareto_search(search_file, out, SearchOptions(threads=1, resume=True))
    # seeded: two processes' runs (one killed and resumed) give the same trials
    assert writes == []  # the cache written before the kill was reused
    assert [(t.slot, t.params, t.outcome) for t in resumed.trials] == [
        (t.slot, t.params, t.outcome) for t in whole.trials
    ]
    assert [t.slot for t in resumed.front] == [t.slot for t in whole.front]
    assert not (out / CACHE_FOLDER).exists()
