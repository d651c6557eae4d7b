"""``alloykit search --ray``: candidates scored in parallel by a pool of Ray actors.

Each actor loads the search file and its tasks (data, prompts, any head model) once, when it
starts, and then merges and scores one candidate per call, exactly as a serial search does
(:func:`alloykit.search.study.score_candidate`, seeded by the trial's slot). The optimiser
stays in the driver with the study: it asks a batch of trials (a CMA-ES generation, or one
random-search trial per actor), the pool scores them, and the results come back in the
batch's order, so the study is told the same values in the same order as in a serial run.

On a multi-node cluster every node must see the search file, its task files and the models
at the same paths (a shared filesystem), with alloykit installed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alloykit.distributed import (
    DistributedError,
    cluster_cpus,
    ray_cluster,
    ray_device,
    resources,
)
from alloykit.errors import AlloyError

if TYPE_CHECKING:
    from alloykit.search.objective import Outcome
    from alloykit.search.study import SearchOptions

log = logging.getLogger("alloykit")
Scored = tuple["Outcome | None", "str | None", float]  # outcome, the candidate's error, seconds


class Scorers(Protocol):
    """Scores batches of candidates (``(config, seed)``), results in the batch's order."""

    size: int

    def score(self, items: list[tuple[dict[str, Any], int]]) -> list[Scored]: ...


class _Scorer:
    """A Ray actor: one search's objective, loaded once, scoring candidates."""

    def __init__(self, search_file: str, options: SearchOptions) -> None:
        from alloykit.search.spec import load_search
        from alloykit.search.study import objective_for

        self.options = options
        self.objective = objective_for(load_search(search_file), options)

    def score(self, config: dict[str, Any], seed: int) -> Scored:
        from alloykit.search.study import score_candidate

        started = time.perf_counter()
        try:
            outcome = score_candidate(self.objective, config, seed, self.options)
        except AlloyError as e:  # the candidate's own failure, recorded as its trial's error
            return None, str(e), time.perf_counter() - started
        return outcome, None, time.perf_counter() - started


class RayScorers:
    """A pool of :class:`_Scorer` actors, one CPU each."""

    def __init__(self, ray: Any, search_file: Path, options: SearchOptions) -> None:
        from ray.util import ActorPool

        self.ray = ray
        # no more actors than the cluster can place: an actor waiting for a free CPU (or GPU)
        # would hold its candidates back forever
        room = cluster_cpus(ray)
        if resources(options.device).get("num_gpus"):
            room = min(room, int(ray.cluster_resources().get("GPU", 0)))
        if room < 1:
            raise DistributedError(
                f"--ray: --device {options.device} needs a GPU and the Ray cluster has none"
            )
        self.size = min(options.ray_workers or room, room)
        if options.ray_workers and options.ray_workers > room:
            log.warning(f"--ray-workers {options.ray_workers}: the cluster has room for {room}")
        actor = ray.remote(max_restarts=1, max_task_retries=1, **resources(options.device))(_Scorer)
        inside = dataclasses.replace(options, device=ray_device(options.device))
        self.actors = [actor.remote(str(search_file.resolve()), inside) for _ in range(self.size)]
        self.pool = ActorPool(self.actors)

    def score(self, items: list[tuple[dict[str, Any], int]]) -> list[Scored]:
        """Score ``items`` on the actors, as they become free; results in ``items``' order."""
        from ray.exceptions import RayError, RayTaskError

        try:
            return list(self.pool.map(lambda a, item: a.score.remote(*item), items))
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, AlloyError):  # e.g. the search file is not on that node
                raise cause from None
            raise DistributedError(f"--ray: scoring a candidate failed: {_first_line(e)}") from e
        except RayError as e:
            raise DistributedError(
                f"--ray: a Ray actor scoring candidates was lost ({type(e).__name__}: "
                f"{_first_line(e)}); resume the search with --resume"
            ) from e

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextmanager
def ray_scorers(search_file: Path, options: SearchOptions) -> Iterator[RayScorers]:
    """Connect to Ray (``options.ray``), start the actors, and stop them after the block."""
    if options.ray_workers is not None and options.ray_workers < 1:
        raise DistributedError(f"--ray-workers {options.ray_workers}: give at least 1")
    with ray_cluster(options.ray, options.ray_workers) as ray:
        scorers = RayScorers(ray, Path(search_file), options)
        try:
            yield scorers
        finally:
            scorers.close()
