"""A kill between CMA-ES's enqueue and its ask must not shift the resumed trials."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from alloykit.search import SearchOptions, run_search
from tests.search.problem import write_search

OPTIONS = SearchOptions(threads=1)


def test_a_trial_enqueued_but_never_asked_is_dropped_on_resume(
    problem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    search_file = write_search(problem, "cmaes", 7, name="enqueued.yml")
    search_file.write_text(search_file.read_text().replace("seed: 0", "seed: 0, popsize: 4"))
    whole = run_search(search_file, problem / "enqueued-whole", OPTIONS)

    asks: list[int] = []
    ask = optuna.Study.ask

    def dies_before_the_fourth_ask(self: optuna.Study, *args: object, **kwargs: object) -> object:
        asks.append(1)
        if len(asks) == 4:  # slot 3 is enqueued (WAITING) and the process dies here
            raise KeyboardInterrupt
        return ask(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(optuna.Study, "ask", dies_before_the_fourth_ask)
    out = problem / "enqueued-killed"
    with pytest.raises(KeyboardInterrupt):
        run_search(search_file, out, OPTIONS)
    monkeypatch.setattr(optuna.Study, "ask", ask)
    waiting = optuna.load_study(
        study_name="alloykit-search", storage=f"sqlite:///{out / 'study.db'}"
    )
    assert len(waiting.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1
    resumed = run_search(search_file, out, SearchOptions(threads=1, resume=True))
    assert [(t.slot, t.params, t.outcome) for t in resumed.trials] == [
        (t.slot, t.params, t.outcome) for t in whole.trials
    ]
