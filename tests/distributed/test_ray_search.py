"""alloykit search --ray: Ray actors score the candidates; the trials are the serial run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alloykit.search import SearchError, SearchOptions, run_search
from alloykit.search.objective import Objective
from alloykit.search.study import Trial
from tests.search.problem import write_search

SERIAL = SearchOptions(threads=1)
RAY = SearchOptions(threads=1, ray="local")  # the session's Ray instance: two workers


def _trials(trials: list[Trial]) -> list[tuple[int, dict[str, object], object]]:
    return [(t.slot, t.params, t.outcome) for t in trials]


@pytest.mark.parametrize(("optimiser", "budget"), [("cmaes", 8), ("random", 5)])
def test_ray_gives_the_trials_and_scores_of_a_serial_run(
    ray_instance: Any,
    problem: Path,
    monkeypatch: pytest.MonkeyPatch,
    optimiser: str,
    budget: int,
) -> None:
    search_file = write_search(problem, optimiser, budget, name=f"ray_{optimiser}.yml")
    if optimiser == "cmaes":  # two generations of four
        search_file.write_text(search_file.read_text().replace("seed: 0", "seed: 0, popsize: 4"))
    serial = run_search(search_file, problem / f"serial-{optimiser}", SERIAL)

    def not_here(self: Objective, model: object, **kwargs: object) -> object:
        raise AssertionError("a candidate was scored in the driver, not by a Ray actor")

    monkeypatch.setattr(Objective, "score", not_here)  # the actors run in other processes
    distributed = run_search(search_file, problem / f"ray-{optimiser}", RAY)
    assert len(distributed.trials) == budget
    assert _trials(distributed.trials) == _trials(serial.trials)
    assert all(t.outcome is not None for t in distributed.trials)
    assert distributed.best is not None and serial.best is not None
    assert distributed.best.slot == serial.best.slot
    assert distributed.test == serial.test
    written = (problem / f"ray-{optimiser}" / "trials.csv").read_text().splitlines()
    expected = (problem / f"serial-{optimiser}" / "trials.csv").read_text().splitlines()
    # the same rows but for the seconds column
    assert [r.rsplit(",", 2)[0] for r in written] == [r.rsplit(",", 2)[0] for r in expected]


def test_no_more_actors_than_the_cluster_has_cpus(ray_instance: Any, problem: Path) -> None:
    from dataclasses import replace

    from alloykit.distributed import DistributedError
    from alloykit.distributed.search import RayScorers

    search_file = write_search(problem, "random", 2, name="ray_room.yml")
    scorers = RayScorers(ray_instance, search_file, replace(RAY, ray_workers=5))
    try:
        assert scorers.size == 2 and len(scorers.actors) == 2
    finally:
        scorers.close()
    with pytest.raises(DistributedError, match="needs a GPU"):
        RayScorers(ray_instance, search_file, SearchOptions(ray="local", device="cuda"))


def test_greedy_soup_refuses_ray_in_one_line(problem: Path, tmp_path: Path) -> None:
    search_file = write_search(problem, "greedy_soup", 3, name="ray_soup.yml")
    with pytest.raises(SearchError, match=r"^--ray: greedy_soup .*without --ray") as caught:
        run_search(search_file, tmp_path / "soup", RAY)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "soup").exists()
