"""Running a search: optimisers, the study in SQLite, resume, and the outputs.

Every candidate is a trial of an optuna study stored in ``OUT/study.db`` (optuna's RDB
storage on SQLite). Each trial carries its *slot*, the number of candidates finished before it,
and all of its randomness (the sampler's draws, the merge's own sampling) comes from
``(seed, slot)``. So a killed search resumes exactly: trials left running are marked failed and
their slots run again with the same randomness, and finished trials are never redone.

Optimisers:

- ``random``, ``tpe`` (Bergstra et al. 2011) and ``gp`` (Gaussian-process Bayesian
  optimisation): optuna's ``RandomSampler``, ``TPESampler`` and ``GPSampler``, a fresh sampler
  per trial seeded by ``(seed, slot)``; TPE and GP also see the ``min_score`` constraints.
- ``cmaes``: the ``cma`` library's CMA-ES (Hansen) in the unit cube of the space, as in Akiba et
  al. 2024, "Evolutionary Optimization of Model Merging Recipes", arXiv:2403.13187. Its state is
  rebuilt on resume by replaying ask/tell over the stored trials: with its own seeded normal
  generator, the same told values give the same next generation.
- ``greedy_soup``: :func:`alloykit.methods.soups.greedy_soup` (Wortsman et al. 2022) over the
  template's models, each soup scored on the validation split.

The test split is scored once, for the best feasible candidate, after the budget is spent.

With ``ray`` set (``alloykit search --ray``), candidates are scored by Ray actors
(:mod:`alloykit.distributed.search`): random search asks as many trials at once as there are
actors and CMA-ES its whole generation, each trial seeded by its slot as in a serial run, and
the study is told the results in slot order, so the trials are those of a serial run. TPE and
GP depend on every earlier result and run one candidate at a time (on the cluster).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alloykit.errors import AlloyError
from alloykit.search.objective import Objective, Outcome, outcome_from
from alloykit.search.space import SearchError
from alloykit.search.spec import Search, load_search

if TYPE_CHECKING:
    import optuna

    from alloykit.distributed.search import Scorers
    from alloykit.search.cache import TaskVectorCache

log = logging.getLogger("alloykit")
STUDY = "alloykit-search"
STUDY_FILE = "study.db"
FAILED_VALUE = 1e3  # what CMA-ES is told for a candidate that could not be merged (minimised)


@dataclass(frozen=True)
class SearchOptions:
    """Options of ``alloykit search`` that are not in the search file.

    ``budget``, ``time_limit`` and ``seed`` override the file's ``optimiser`` values.
    """

    device: str = "cpu"
    budget: int | None = None
    time_limit: float | None = None
    seed: int | None = None
    resume: bool = False
    save_model: bool = False
    threads: int | None = None
    cache_task_vectors: bool = True  # task vectors written once to OUT/task_vectors (see cache)
    ray: str | None = None  # Ray address (``local``, ``auto``, HOST:PORT); None: this process
    ray_workers: int | None = None  # Ray actors scoring candidates (default: the cluster's CPUs)


@dataclass(frozen=True)
class Trial:
    """One finished candidate."""

    slot: int
    params: dict[str, Any]
    config: dict[str, Any]
    outcome: Outcome | None  # None when the candidate could not be merged or scored
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class SearchResult:
    """What a search found and wrote."""

    out: Path
    trials: list[Trial]
    best: Trial | None
    test: Outcome | None
    candidates_per_minute: float
    files: list[str] = field(default_factory=list)


TrialHook = Callable[[Trial, int], None]  # called with each new trial and the budget


def trial_seed(seed: int, slot: int | str) -> int:
    """The seed of one trial's randomness: a stable hash of (seed, slot), below 2**31."""
    digest = hashlib.sha256(f"alloykit-search\x1f{seed}\x1f{slot}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def require_libraries() -> None:
    """Raise a one-line :class:`SearchError` when optuna or cma is missing."""
    try:
        import cma  # noqa: F401
        import optuna  # noqa: F401
    except ImportError as e:
        raise SearchError(
            f"alloykit search needs optuna and cma ({e.name} is missing): "
            "pip install 'alloykit[search]'"
        ) from e


def run_search(
    search_file: str | Path,
    out: str | Path,
    options: SearchOptions | None = None,
    *,
    on_trial: TrialHook | None = None,
) -> SearchResult:
    """Search the recipe space of ``search_file``; write the study and results under ``out``.

    Example:
        >>> result = run_search("search.yml", "runs/s1")  # doctest: +SKIP
        >>> result.best.outcome.score, result.test.score  # doctest: +SKIP
        (0.81, 0.79)
    """
    require_libraries()
    import optuna

    options = options or SearchOptions()
    search = load_search(search_file)
    settings = search.spec.optimiser
    budget = options.budget or settings.budget
    time_limit = options.time_limit or settings.time_limit
    seed = settings.seed if options.seed is None else options.seed
    out = Path(out)
    if options.ray is not None and settings.name == "greedy_soup":
        raise SearchError(
            "--ray: greedy_soup scores one soup after another, each depending on the last; "
            "run it without --ray, or use cmaes or random"
        )
    if options.ray is not None:
        from alloykit.distributed import require_ray

        require_ray()
    created = _prepare_folder(out, options.resume)
    stack = contextlib.ExitStack()  # the Ray actors, when there are any
    try:
        objective = _objective(search, options)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report the trials
        study = _open_study(out, search, seed, options.resume)
        scorers = None
        if options.ray is not None:
            from alloykit.distributed.search import ray_scorers

            scorers = stack.enter_context(ray_scorers(search.path, options))
    except BaseException:
        stack.close()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    # Ray actors merge from the checkpoints: the cache serves this process's candidates
    cache = task_vector_cache(out, options) if scorers is None else None
    name = settings.name
    with stack:
        runner = _Runner(
            search, objective, study, seed, options, on_trial, budget, cache, scorers=scorers
        )
        deadline = time.monotonic() + time_limit if time_limit else math.inf
        if name == "cmaes":
            runner.run_cmaes(budget, deadline)
        elif name == "greedy_soup":
            runner.run_soup(deadline)
        else:
            runner.run_sequential(name, budget, deadline)
    trials = stored_trials(study)
    best = best_trial(trials)
    test = _test_once(study, objective, best, seed, options, cache) if best is not None else None
    files = write_outputs(out, search, trials, best, test, runner, options, seed)
    if cache is not None:  # kept after a kill, for --resume; a finished search needs it no more
        cache.remove()
    return SearchResult(out, trials, best, test, runner.candidates_per_minute, files)


# --------------------------------------------------------------------------- setup


def task_vector_cache(out: Path, options: SearchOptions) -> TaskVectorCache | None:
    """The search's task-vector cache in ``OUT/task_vectors`` (None when turned off)."""
    from alloykit.search.cache import CACHE_FOLDER, TaskVectorCache

    return TaskVectorCache(out / CACHE_FOLDER) if options.cache_task_vectors else None


def _prepare_folder(out: Path, resume: bool) -> bool:
    """Check the output folder; returns True when this call created it."""
    db = out / STUDY_FILE
    if resume:
        if not db.is_file():
            raise SearchError(f"--resume: '{out}' holds no study ({STUDY_FILE}); start without it")
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SearchError(
            f"output folder '{out}' exists and is not empty; pass --resume to continue its "
            "study, or choose a new folder"
        )
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return not existed


def _objective(search: Search, options: SearchOptions) -> Objective:
    from alloykit.evaluation import EvalOptions

    spec = search.spec.objective
    return Objective(
        search,
        EvalOptions(
            device=options.device,
            batch_size=spec.batch_size,
            dtype=spec.dtype,
            threads=options.threads,
        ),
    )


def _open_study(out: Path, search: Search, seed: int, resume: bool) -> optuna.Study:
    import optuna

    storage = f"sqlite:///{(out / STUDY_FILE).resolve()}"
    study = optuna.create_study(
        storage=storage, study_name=STUDY, direction="maximize", load_if_exists=resume
    )
    if not resume:
        study.set_user_attr("digest", search.digest)
        study.set_user_attr("seed", seed)
        (out / "search.yml").write_text(search.path.read_text())
        return study
    if study.user_attrs.get("digest") != search.digest:
        raise SearchError(
            f"--resume: the search file '{search.path}' differs from the one the study in "
            f"'{out}' began with (space, objective or optimiser); start a new folder"
        )
    if study.user_attrs.get("seed") != seed:
        raise SearchError(
            f"--resume: the study began with seed {study.user_attrs.get('seed')}, not {seed}"
        )
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # left unfinished by a kill: marked failed, its slot runs again
        study.tell(trial.number, state=TrialState.FAIL)
    for _ in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        # enqueued (CMA-ES) but not yet asked when the process died: the next ask would take
        # it instead of what the resumed run enqueues, shifting every later slot; dropped
        study.tell(study.ask(), state=TrialState.FAIL)
    return study


# --------------------------------------------------------------------------- the stored trials


def stored_trials(study: optuna.Study) -> list[Trial]:
    """The finished trials (scored, or failed with an error), by slot."""
    from optuna.trial import TrialState

    trials: dict[int, Trial] = {}
    for frozen in study.get_trials(deepcopy=False):
        attrs = frozen.user_attrs
        if "slot" not in attrs:
            continue
        if frozen.state == TrialState.COMPLETE:
            outcome: Outcome | None = outcome_from(attrs)
        elif frozen.state == TrialState.FAIL and "error" in attrs:
            outcome = None
        else:
            continue
        trials[int(attrs["slot"])] = Trial(
            int(attrs["slot"]),
            dict(frozen.params),
            dict(attrs["config"]),
            outcome,
            float(attrs.get("seconds", 0.0)),
            attrs.get("error"),
        )
    return [trials[slot] for slot in sorted(trials)]


def best_trial(trials: list[Trial]) -> Trial | None:
    """The feasible trial with the highest score (the earliest on ties); None if none is."""
    feasible = [t for t in trials if t.outcome is not None and t.outcome.feasible]
    if not feasible:
        return None
    return max(feasible, key=lambda t: (t.outcome.score if t.outcome else -math.inf, -t.slot))


def _value(trial: Trial) -> float | None:
    return trial.outcome.value if trial.outcome is not None else None


# --------------------------------------------------------------------------- the optimisers


class _Runner:
    """Evaluates candidates and records them as trials of the study."""

    def __init__(
        self,
        search: Search,
        objective: Objective,
        study: optuna.Study,
        seed: int,
        options: SearchOptions,
        on_trial: TrialHook | None,
        budget: int,
        task_vectors: TaskVectorCache | None = None,
        scorers: Scorers | None = None,
    ) -> None:
        self.search = search
        self.task_vectors = task_vectors
        self.objective = objective
        self.study = study
        self.seed = seed
        self.options = options
        self.on_trial = on_trial
        self.budget = budget
        self.scorers = scorers  # Ray actors scoring batches; None: score here, one at a time
        self.evaluated = 0  # candidates evaluated by this call (not replayed)
        self.seconds = 0.0

    @property
    def candidates_per_minute(self) -> float:
        return 60.0 * self.evaluated / self.seconds if self.seconds else 0.0

    def finished(self) -> dict[int, Trial]:
        return {t.slot: t for t in stored_trials(self.study)}

    def evaluate(
        self,
        trial: optuna.trial.Trial,
        slot: int,
        config: dict[str, Any],
        score: Callable[[], Outcome],
    ) -> Trial:
        """Score one candidate and tell the study; errors of the candidate are recorded."""
        started = time.perf_counter()
        self._start(trial, slot, config)
        outcome: Outcome | None = None
        error = None
        try:
            outcome = score()
        except AlloyError as e:
            error = str(e)
        return self._record(trial, slot, config, outcome, error, time.perf_counter() - started)

    @staticmethod
    def _start(trial: optuna.trial.Trial, slot: int, config: dict[str, Any]) -> None:
        trial.set_user_attr("slot", slot)
        trial.set_user_attr("config", config)

    def _record(
        self,
        trial: optuna.trial.Trial,
        slot: int,
        config: dict[str, Any],
        outcome: Outcome | None,
        error: str | None,
        seconds: float,
    ) -> Trial:
        """Tell the study one candidate's outcome (or its error) and report it."""
        from optuna.trial import TrialState

        trial.set_user_attr("seconds", seconds)
        if outcome is not None:
            trial.set_user_attr("score", outcome.score)
            trial.set_user_attr("tasks", outcome.tasks)
            trial.set_user_attr("violation", outcome.violation)
            if hasattr(trial, "set_constraint"):  # optuna 5: TPE and GP read it from the trial
                trial.set_constraint("min_score", outcome.violation)
            self.study.tell(trial, outcome.value)
        else:
            trial.set_user_attr("error", error)
            self.study.tell(trial, state=TrialState.FAIL)
        self.evaluated += 1
        self.seconds += seconds
        record = Trial(slot, dict(trial.params), config, outcome, seconds, error)
        if self.on_trial is not None:
            self.on_trial(record, self.budget)
        return record

    def merge_and_score(self, config: dict[str, Any], slot: int) -> Outcome:
        return score_candidate(
            self.objective, config, trial_seed(self.seed, slot), self.options, self.task_vectors
        )

    def _candidate(self, trial: optuna.trial.Trial, slot: int) -> Trial:
        config = self.search.space.config(trial.params)
        return self.evaluate(trial, slot, config, lambda: self.merge_and_score(config, slot))

    def evaluate_batch(
        self, slots: list[int], ask: Callable[[int], optuna.trial.Trial], deadline: float
    ) -> list[Trial]:
        """Ask and score the candidates of ``slots``, telling the study in slot order.

        Here, one at a time, none started after ``deadline``; with Ray actors, all at once
        (or none, after the deadline). Returns the finished trials.
        """
        if self.scorers is None:
            records = []
            for slot in slots:
                if time.monotonic() >= deadline:
                    break
                records.append(self._candidate(ask(slot), slot))
            return records
        if not slots or time.monotonic() >= deadline:
            return []
        started = time.perf_counter()
        trials = [ask(slot) for slot in slots]
        configs = [self.search.space.config(trial.params) for trial in trials]
        for trial, slot, config in zip(trials, slots, configs, strict=True):
            self._start(trial, slot, config)
        seeds = [trial_seed(self.seed, slot) for slot in slots]
        results = self.scorers.score(list(zip(configs, seeds, strict=True)))
        records = [
            self._record(trial, slot, config, outcome, error, seconds)
            for trial, slot, config, (outcome, error, seconds) in zip(
                trials, slots, configs, results, strict=True
            )
        ]
        # candidates per minute of the cluster: wall time, not the sum of the candidates'
        self.seconds += time.perf_counter() - started - sum(r.seconds for r in records)
        return records

    def run_sequential(self, name: str, budget: int, deadline: float) -> None:
        """Random search, TPE or GP: a fresh seeded sampler for each trial.

        With Ray actors, random search asks one trial per actor at a time (its draws depend
        on the slot only); TPE and GP, which learn from every earlier trial, ask one.
        """
        distributions = self.search.space.distributions()
        batch = self.scorers.size if self.scorers is not None and name == "random" else 1

        def ask(slot: int) -> optuna.trial.Trial:
            self.study.sampler = self._sampler(name, trial_seed(self.seed, slot))
            return self.study.ask(distributions)

        while time.monotonic() < deadline:
            slot = len(self.finished())
            if slot >= budget:
                break
            slots = list(range(slot, min(slot + batch, budget)))
            if not self.evaluate_batch(slots, ask, deadline):
                break

    def _sampler(self, name: str, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        startup = self.search.spec.optimiser.startup_trials

        def violation(frozen: optuna.trial.FrozenTrial) -> list[float]:
            return [float(frozen.user_attrs.get("violation", 0.0))]

        # optuna 4 takes a function; optuna 5 reads what Trial.set_constraint stored
        constraints = None if hasattr(optuna.trial.Trial, "set_constraint") else violation

        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=startup, constraints_func=constraints
            )
        return optuna.samplers.GPSampler(
            seed=seed,
            n_startup_trials=startup,
            constraints_func=constraints,
        )

    def run_cmaes(self, budget: int, deadline: float) -> None:
        """CMA-ES in the unit cube; finished slots are replayed from the study, not re-run."""
        import cma
        import numpy as np

        space = self.search.space
        settings = self.search.spec.optimiser
        rng = np.random.default_rng(trial_seed(self.seed, "cma"))

        def randn(*shape: int) -> Any:
            return rng.standard_normal(shape)

        dims = len(space.dimensions)
        opts: dict[str, Any] = {
            "seed": trial_seed(self.seed, "cma-init") or 1,
            "bounds": [0.0, 1.0],
            "verbose": -9,
            "randn": randn,
        }
        if settings.popsize:
            opts["popsize"] = settings.popsize
        if dims == 1:  # cma needs two coordinates; a second, unused one keeps it running
            dims = 2
        strategy = cma.CMAEvolutionStrategy([0.5] * dims, settings.sigma0, opts)
        finished = self.finished()
        distributions = space.distributions()
        slot = 0
        while slot < budget:
            points = strategy.ask()
            slots = list(range(slot, min(slot + len(points), budget)))
            todo = [s for s in slots if s not in finished]

            def ask(at: int, first: int = slot, points: list[Any] = points) -> optuna.trial.Trial:
                params = space.from_unit(list(points[at - first])[: len(space.dimensions)])
                self.study.enqueue_trial(params)
                self.study.sampler = _quiet_random(trial_seed(self.seed, at))
                return self.study.ask(distributions)

            # a whole generation at once: on Ray actors its candidates run in parallel
            finished.update({r.slot: r for r in self.evaluate_batch(todo, ask, deadline)})
            if any(s not in finished for s in todo) or len(slots) < len(points):
                return  # the time limit or the budget ended the generation
            losses = []
            for s in slots:
                value = _value(finished[s])
                losses.append(FAILED_VALUE if value is None else -value)
            strategy.tell(points, losses)
            slot += len(points)

    def run_soup(self, deadline: float) -> None:
        """Greedy soup over the template's models, every soup scored as one trial.

        :func:`greedy_soup` scores each model, then each soup with one more model in the order
        of the models' scores; the members of each scored state follow from that documented
        order and from the scores, which is how each trial gets its recipe.
        """
        from alloykit.methods.soups import greedy_soup

        template = self.search.space.template
        entries = [entry["model"] for entry in template.get("models") or []]
        models = [m["model"] if isinstance(m, dict) else str(m) for m in entries]
        if len(models) < 2:
            raise SearchError(
                f"search file '{self.search.path}': greedy_soup needs a template with "
                "'models' listing at least two models"
            )
        finished = self.finished()
        states = [_read_model(m) for m in models]
        like = _folder(models[0])
        individual: list[float] = []
        soup: list[int] = []
        kept = [-math.inf]

        def members_of(slot: int) -> list[int]:
            if slot < len(models):
                return [slot]
            order = sorted(range(len(models)), key=lambda i: -individual[i])
            return [*soup, order[slot - len(models) + 1]]

        def score(state: Any) -> float:
            slot = len(calls)
            calls.append(slot)
            members = members_of(slot)
            config = soup_recipe(template, [models[i] for i in members])
            record = finished.get(slot)
            if record is None:
                if time.monotonic() >= deadline:
                    raise _OutOfTime
                self.study.sampler = _quiet_random(trial_seed(self.seed, slot))
                trial = self.study.ask()
                trial.set_user_attr("members", members)
                record = self.evaluate(
                    trial, slot, config, lambda: self.objective.score(state, like=like)
                )
            value = _value(record)
            value = -math.inf if value is None else value
            if slot < len(models):
                individual.append(value)
                if len(individual) == len(models):
                    order = sorted(range(len(models)), key=lambda i: -individual[i])
                    soup.append(order[0])
                    kept[0] = individual[order[0]]
            elif value >= kept[0]:  # greedy_soup keeps an ingredient unless the score drops
                soup.append(members[-1])
                kept[0] = value
            return value

        calls: list[int] = []
        try:
            greedy_soup(list(range(len(models))), score, load=lambda i: states[i])
        except _OutOfTime:
            return


def score_candidate(
    objective: Objective,
    config: dict[str, Any],
    seed: int,
    options: SearchOptions,
    task_vectors: TaskVectorCache | None = None,
) -> Outcome:
    """Merge ``config`` in memory with the trial's ``seed`` and score it on the validation split.

    What every candidate goes through, here or in a Ray actor; ``task_vectors`` is the
    search's cache of ``x − base`` (:mod:`alloykit.search.cache`), when there is one.
    """
    from alloykit.pipeline import MergeOptions, merge_in_memory

    merge_options = MergeOptions(device=options.device, seed=seed, threads=options.threads)
    return objective.score(merge_in_memory(config, merge_options, task_vectors=task_vectors))


def objective_for(search: Search, options: SearchOptions) -> Objective:
    """The search's objective with the evaluation options of ``options``."""
    return _objective(search, options)


def _quiet_random(seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


class _OutOfTime(Exception):
    pass


def soup_recipe(template: Mapping[str, Any], models: list[str]) -> dict[str, Any]:
    """The uniform average of ``models`` as a linear merge recipe."""
    recipe: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
    }
    if template.get("dtype"):
        recipe["dtype"] = template["dtype"]
    return recipe


def _folder(reference: str) -> Path:
    from alloykit.io.hub import resolve_model

    return Path(resolve_model(reference, None))


def _read_model(reference: str) -> dict[str, Any]:
    from alloykit.io.checkpoint import open_checkpoint

    with open_checkpoint(_folder(reference)) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}


# --------------------------------------------------------------------------- results


def _test_once(
    study: optuna.Study,
    objective: Objective,
    best: Trial,
    seed: int,
    options: SearchOptions,
    task_vectors: TaskVectorCache | None = None,
) -> Outcome | None:
    """The best candidate's test outcome, scored now or read from an earlier finish."""
    stored = study.user_attrs.get("test")
    if stored is not None and stored.get("slot") == best.slot:
        return outcome_from(stored) if stored.get("score") is not None else None
    from alloykit.pipeline import MergeOptions, merge_in_memory

    merge_options = MergeOptions(
        device=options.device, seed=trial_seed(seed, best.slot), threads=options.threads
    )
    merged = merge_in_memory(best.config, merge_options, task_vectors=task_vectors)
    outcome = objective.score_test(merged)
    record: dict[str, Any] = {"slot": best.slot, "score": None}
    if outcome is not None:
        record.update(score=outcome.score, tasks=outcome.tasks, violation=outcome.violation)
    study.set_user_attr("test", record)
    return outcome


def write_outputs(
    out: Path,
    search: Search,
    trials: list[Trial],
    best: Trial | None,
    test: Outcome | None,
    runner: _Runner,
    options: SearchOptions,
    seed: int,
) -> list[str]:
    """best.yml, trials.csv, summary.json, progress.png (with matplotlib), model/ on request."""
    files = []
    _atomic(out / "trials.csv", trials_csv(trials, search))
    files.append("trials.csv")
    if best is not None:
        _atomic(out / "best.yml", best_recipe(best, search))
        files.append("best.yml")
    summary = {
        "search": str(search.path),
        "optimiser": search.spec.optimiser.name,
        "seed": seed,
        "trials": len(trials),
        "feasible": sum(1 for t in trials if t.outcome is not None and t.outcome.feasible),
        "best": None
        if best is None or best.outcome is None
        else {
            "slot": best.slot,
            "params": best.params,
            "validation": {"score": best.outcome.score, "tasks": best.outcome.tasks},
            "test": None if test is None else {"score": test.score, "tasks": test.tasks},
        },
        "candidates_per_minute": round(runner.candidates_per_minute, 2),
    }
    _atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    files.append("summary.json")
    if plot_progress(trials, out / "progress.png"):
        files.append("progress.png")
    if options.save_model and best is not None:
        from alloykit.pipeline import MergeOptions, merge

        shards = None
        if options.ray is not None:  # the shards as Ray tasks, like merge --ray
            from alloykit.distributed.merge import ray_shard_runner

            shards = ray_shard_runner(options.ray, options.ray_workers)
        merge(
            best.config,
            out / "model",
            MergeOptions(
                device=options.device,
                seed=trial_seed(seed, best.slot),
                threads=options.threads,
                overwrite=True,
            ),
            shard_runner=shards,
        )
        files.append("model/")
    return files


def best_recipe(best: Trial, search: Search) -> str:
    """The best candidate as a recipe ``alloykit merge`` takes (model paths made absolute)."""
    from alloykit.config import load_config
    from alloykit.pipeline import portable_recipe

    config = portable_recipe(load_config(best.config))
    score = best.outcome.score if best.outcome else float("nan")
    header = (
        f"# alloykit search '{search.path.name}': trial {best.slot}, validation score "
        f"{score:.6g}\n# alloykit merge best.yml OUT\n"
    )
    return header + config.to_yaml()


def trials_csv(trials: list[Trial], search: Search) -> str:
    """Every trial as one CSV row: slot, value, score, feasibility, task scores, parameters."""
    tasks = sorted({name for t in trials if t.outcome for name in t.outcome.tasks})
    params = search.space.names or sorted({p for t in trials for p in t.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "score", "feasible", *tasks, *params, "seconds", "error"])
    for t in trials:
        o = t.outcome
        writer.writerow(
            [
                t.slot,
                "" if o is None else repr(o.score),
                "" if o is None else o.feasible,
                *["" if o is None else repr(o.tasks.get(name, "")) for name in tasks],
                *[t.params.get(p, "") for p in params],
                f"{t.seconds:.4f}",
                t.error or "",
            ]
        )
    return buffer.getvalue()


def best_so_far(trials: list[Trial]) -> list[float]:
    """The best feasible score after each evaluation (NaN until one is feasible)."""
    best = -math.inf
    curve = []
    for t in trials:
        if t.outcome is not None and t.outcome.feasible:
            best = max(best, t.outcome.score)
        curve.append(best if best > -math.inf else math.nan)
    return curve


def plot_progress(trials: list[Trial], path: Path) -> bool:
    """A PNG of the best feasible score against evaluations; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("progress.png not drawn: pip install 'alloykit[plots]' for plots")
        return False
    figure, axes = plt.subplots(figsize=(6, 3.5))
    xs = list(range(1, len(trials) + 1))
    for feasible, marker, label in ((True, "o", "candidate"), (False, "x", "infeasible")):
        points = [
            (x, t.outcome.score)
            for x, t in zip(xs, trials, strict=True)
            if t.outcome is not None and t.outcome.feasible == feasible
        ]
        if points:
            axes.plot(*zip(*points, strict=True), marker, color="0.6", markersize=4, label=label)
    axes.step(xs, best_so_far(trials), where="post", label="best feasible")
    axes.set_xlabel("evaluations")
    axes.set_ylabel("validation score")
    axes.legend(loc="lower right")
    figure.tight_layout()
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return True


def _atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
