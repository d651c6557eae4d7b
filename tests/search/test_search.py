"""Recipe search end to end on a tiny problem (tests/search/fixtures.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from alloykit.evaluation import EvalOptions
from alloykit.search import SearchError, SearchOptions, load_search, run_search
from alloykit.search.objective import Objective
from alloykit.search.study import Trial
from tests.search.problem import write_search

OPTIONS = SearchOptions(threads=1)  # the tiny models run fastest on one thread


def _trials(trials: list[Trial]) -> list[tuple[int, dict[str, object], float | None]]:
    return [(t.slot, t.params, t.outcome.score if t.outcome else None) for t in trials]


def test_tpe_gets_near_the_grid_best_and_beats_the_uniform_average(problem: Path) -> None:
    search_file = write_search(problem, "tpe", 30)
    search = load_search(search_file)
    objective = Objective(search, EvalOptions(threads=1))
    from alloykit.pipeline import MergeOptions, merge_in_memory

    def score(w1: float, w2: float) -> float:
        names = search.space.names
        config = search.space.config({names[0]: w1, names[1]: w2})
        return objective.score(merge_in_memory(config, MergeOptions(seed=0))).score

    grid = [i * 0.25 for i in range(9)]  # 0, 0.25, ..., 2 on both weights: 81 recipes
    grid_best = max(score(w1, w2) for w1, w2 in itertools.product(grid, grid))
    uniform = score(0.5, 0.5)  # the plain average of the two fine-tunes
    assert grid_best > uniform + 0.02

    result = run_search(search_file, problem / "tpe", OPTIONS)
    assert len(result.trials) == 30
    assert result.best is not None and result.best.outcome is not None
    assert result.best.outcome.score >= grid_best - 0.02
    assert result.best.outcome.score > uniform
    assert result.test is not None  # scored once, for the best

    # seeded, each trial's randomness from (seed, trial): a shorter run is the same start
    again = run_search(search_file, problem / "tpe-again", SearchOptions(threads=1, budget=10))
    assert _trials(again.trials) == _trials(result.trials)[:10]


@pytest.mark.parametrize(("optimiser", "budget", "kill_at"), [("cmaes", 10, 6), ("random", 6, 3)])
def test_kill_and_resume_gives_the_trials_of_an_uninterrupted_run(
    problem: Path, monkeypatch: pytest.MonkeyPatch, optimiser: str, budget: int, kill_at: int
) -> None:
    search_file = write_search(problem, optimiser, budget, extra="", name=f"resume_{optimiser}.yml")
    if optimiser == "cmaes":  # four per generation: the kill lands inside the second one
        search_file.write_text(search_file.read_text().replace("seed: 0", "seed: 0, popsize: 4"))
    whole = run_search(search_file, problem / f"whole-{optimiser}", OPTIONS)

    calls: list[int] = []
    kills: list[int] = []
    score = Objective.score

    def killed(self: Objective, model: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == kill_at and not kills:
            kills.append(1)
            raise KeyboardInterrupt  # the process dies in the middle of a trial
        return score(self, model, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Objective, "score", killed)
    out = problem / f"killed-{optimiser}"
    with pytest.raises(KeyboardInterrupt):
        run_search(search_file, out, OPTIONS)
    with pytest.raises(SearchError, match="--resume"):
        run_search(search_file, out, OPTIONS)  # the folder holds a study: resume it
    calls.clear()
    resumed = run_search(search_file, out, SearchOptions(threads=1, resume=True))
    assert len(calls) == budget - (kill_at - 1)  # the killed trial again, nothing finished
    assert _trials(resumed.trials) == _trials(whole.trials)
    assert resumed.best is not None and whole.best is not None
    assert resumed.best.slot == whole.best.slot


def test_the_test_split_is_read_once_at_the_end(
    problem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alloykit.evaluation import tasks

    reads: list[str] = []
    read_rows = tasks.read_rows

    def counted(file: Path) -> list[dict[str, object]]:
        reads.append(Path(file).name)
        return read_rows(file)

    monkeypatch.setattr(tasks, "read_rows", counted)
    seen_before: list[int] = []

    def on_trial(trial: Trial, budget: int) -> None:
        seen_before.append(sum(name.endswith("_test.jsonl") for name in reads))

    search_file = write_search(problem, "random", 4, name="once.yml")
    result = run_search(search_file, problem / "once", OPTIONS, on_trial=on_trial)
    assert seen_before == [0, 0, 0, 0]  # no trial ever saw a test row
    assert sorted(n for n in reads if n.endswith("_test.jsonl")) == ["a_test.jsonl", "b_test.jsonl"]
    assert result.test is not None and set(result.test.tasks) == {"a", "b"}
    objective = Objective(load_search(search_file), EvalOptions(threads=1))
    objective.score_test(problem / "once" / "best.yml")
    with pytest.raises(SearchError, match="scored once"):
        objective.score_test(problem / "once" / "best.yml")
    # finishing again (resume after the end) reuses the stored test scores: no new read
    reads.clear()
    again = run_search(search_file, problem / "once", SearchOptions(threads=1, resume=True))
    assert not [n for n in reads if n.endswith("_test.jsonl")]
    assert again.test == result.test


def test_infeasible_candidates_are_never_the_best(problem: Path) -> None:
    free = run_search(
        write_search(problem, "random", 8, name="free.yml"), problem / "free", OPTIONS
    )
    assert free.best is not None and free.best.outcome is not None
    # ask for more of task a than the unconstrained best has: it becomes infeasible
    floor = free.best.outcome.tasks["a"] + 1e-6
    extra = f"    - task: a.yml\n      min_score: {floor}\n"
    search_file = write_search(problem, "random", 8, name="bound.yml")
    search_file.write_text(search_file.read_text().replace("    - task: a.yml\n", extra))
    bound = run_search(search_file, problem / "bound", OPTIONS)
    assert _trials(bound.trials) == _trials(free.trials)  # random search: the same candidates
    feasible = [t for t in bound.trials if t.outcome and t.outcome.feasible]
    assert feasible, "the test needs some feasible candidates"
    assert bound.best is not None and bound.best.outcome is not None
    assert bound.best.slot != free.best.slot
    assert bound.best.outcome.tasks["a"] >= floor
    assert bound.best.outcome.score == max(t.outcome.score for t in feasible if t.outcome)
    higher = [t for t in bound.trials if t.outcome and t.outcome.score > bound.best.outcome.score]
    assert higher and all(not t.outcome.feasible for t in higher if t.outcome)

    none = write_search(problem, "random", 3, name="none.yml")
    none.write_text(
        none.read_text().replace("    - task: a.yml\n", "    - {task: a.yml, min_score: 2}\n")
    )
    nothing = run_search(none, problem / "none", OPTIONS)
    assert nothing.best is None and nothing.test is None
    assert not (problem / "none" / "best.yml").exists()


def test_a_time_limit_stops_starting_candidates(problem: Path) -> None:
    search_file = write_search(problem, "random", 500, name="timed.yml")
    result = run_search(search_file, problem / "timed", SearchOptions(threads=1, time_limit=1.0))
    assert 1 <= len(result.trials) < 500
    assert sum(t.seconds for t in result.trials[:-1]) < 1.0  # none started after the limit


def test_a_killed_process_resumes_to_the_uninterrupted_trials(problem: Path) -> None:
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    search_file = write_search(problem, "cmaes", 8, name="sigkill.yml")
    search_file.write_text(search_file.read_text().replace("seed: 0", "seed: 0, popsize: 4"))
    out = problem / "sigkill"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "alloykit.cli",
        "search",
        str(search_file),
        str(out),
        "-j",
        "1",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished = 0
    deadline = time.monotonic() + 240
    while finished < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if (out / "study.db").is_file():
            with sqlite3.connect(out / "study.db") as db:
                try:
                    finished = db.execute(
                        "select count(*) from trials where state = 'COMPLETE'"
                    ).fetchone()[0]
                except sqlite3.OperationalError:  # tables not created yet
                    finished = 0
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= finished < 8, process.stderr.read() if process.stderr else ""
    resumed = run_search(search_file, out, SearchOptions(threads=1, resume=True))
    whole = run_search(search_file, problem / "sigkill-whole", OPTIONS)
    assert _trials(resumed.trials) == _trials(whole.trials)
