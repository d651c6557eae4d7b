"""Multi-objective recipe search: every task its own objective, the result a Pareto front.

A search file with ``objective: {pareto: true}`` makes each task of the objective one
objective (maximised; lower-is-better metrics such as perplexity negated) instead of folding
them into one weighted mean. The study is an optuna study with one direction per task, run by
one of optuna's multi-objective samplers:

- ``nsga2``: NSGA-II (Deb et al. 2002, "A fast and elitist multiobjective genetic algorithm:
  NSGA-II"), optuna's ``NSGAIISampler``, ``optimiser.population`` candidates per generation;
- ``nsga3``: NSGA-III (Deb & Jain 2014), optuna's ``NSGAIIISampler`` (reference points, for
  three or more objectives);
- ``tpe``: multi-objective TPE (Ozaki et al. 2020/2022), optuna's ``TPESampler``;
- ``random``: optuna's ``RandomSampler``.

As in :mod:`alloykit.search.study`, trial *n* draws all of its randomness from (seed, *n*)
(a fresh sampler seeded for it; the samplers keep their state, NSGA's generations included, in
the study), the study lives in ``OUT/study.db`` and ``--resume`` continues it. A task's
``min_score``/``max_score`` is a constraint: infeasible candidates are told to the sampler as
such and never enter the front.

The front is the set of feasible candidates no other feasible candidate dominates (at least as
good on every objective and better on one); of candidates with identical scores the first is
kept. Outputs: ``pareto.csv`` (the front as a table), ``pareto/trial_N.yml`` (each point's
recipe, as ``alloykit merge`` takes it), ``pareto.png`` (the scores of every candidate with the
front marked, one panel per pair of objectives), ``trials.csv`` and ``summary.json``. The test
split is not read: choose a point on the validation front, then score it once with
``alloykit evaluate``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alloykit.errors import AlloyError
from alloykit.search.objective import Objective, Outcome, outcome_from
from alloykit.search.space import SearchError
from alloykit.search.spec import Search, load_search
from alloykit.search.study import (
    STUDY,
    STUDY_FILE,
    SearchOptions,
    Trial,
    _atomic,
    _objective,
    _prepare_folder,
    best_recipe,
    require_libraries,
    task_vector_cache,
    trial_seed,
    trials_csv,
)

if TYPE_CHECKING:
    import optuna

    from alloykit.search.cache import TaskVectorCache

PARETO_FOLDER = "pareto"


@dataclass(frozen=True)
class ParetoResult:
    """What a Pareto search found and wrote."""

    out: Path
    objectives: list[str]  # the task names, in the search file's order
    trials: list[Trial]
    front: list[Trial]  # non-dominated feasible trials, by slot
    candidates_per_minute: float
    files: list[str] = field(default_factory=list)


def objective_values(outcome: Outcome, names: Sequence[str], lower: Sequence[bool]) -> list[float]:
    """An outcome's objective vector: each task's score, negated where lower is better."""
    return [
        -outcome.tasks[n] if low else outcome.tasks[n] for n, low in zip(names, lower, strict=True)
    ]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` Pareto-dominates ``b`` (maximising): no worse anywhere, better somewhere."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (maximising), in order; of equal points the first.

    Example:
        >>> pareto_front([(1, 0), (0, 1), (0.5, 0.5), (0.4, 0.4), (1, 0)])
        [0, 1, 2]
    """
    kept: list[int] = []
    for i, p in enumerate(points):
        if any(dominates(q, p) for q in points):
            continue
        if any(tuple(points[j]) == tuple(p) for j in kept):
            continue
        kept.append(i)
    return kept


def run_pareto_search(
    search_file: str | Path,
    out: str | Path,
    options: SearchOptions | None = None,
    *,
    on_trial: Callable[[Trial, int], None] | None = None,
) -> ParetoResult:
    """Search ``search_file`` (with ``objective.pareto: true``) for the Pareto front.

    Example:
        >>> result = run_pareto_search("pareto.yml", "runs/p1")  # doctest: +SKIP
        >>> [t.outcome.tasks for t in result.front]  # doctest: +SKIP
    """
    require_libraries()
    import optuna

    options = options or SearchOptions()
    search = load_search(search_file)
    if not search.spec.objective.pareto:
        raise SearchError(
            f"search file '{search.path}': objective.pareto is not true; run it with "
            "alloykit search (one weighted score)"
        )
    if options.save_model:
        logging.getLogger("alloykit").warning(
            "--save-model: a Pareto search has no single best model; merge the point you choose "
            "with alloykit merge OUT/pareto/trial_N.yml"
        )
    settings = search.spec.optimiser
    budget = options.budget or settings.budget
    time_limit = options.time_limit or settings.time_limit
    seed = settings.seed if options.seed is None else options.seed
    out = Path(out)
    created = _prepare_folder(out, options.resume)
    try:
        objective = _objective(search, options)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = _open_study(out, search, seed, len(objective.validation), options.resume)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    names = [task.name for task in objective.validation]
    lower = [task.lower_is_better for task in objective.validation]
    cache = task_vector_cache(out, options)
    runner = _ParetoRunner(search, objective, study, seed, options, names, lower, cache)
    deadline = time.monotonic() + time_limit if time_limit else float("inf")
    distributions = search.space.distributions()
    while time.monotonic() < deadline:
        slot = len(runner.finished())
        if slot >= budget:
            break
        study.sampler = _sampler(settings.name, trial_seed(seed, slot), settings.population)
        record = runner.candidate(study.ask(distributions), slot)
        if on_trial is not None:
            on_trial(record, budget)
    trials = sorted(runner.finished().values(), key=lambda t: t.slot)
    feasible = [t for t in trials if t.outcome is not None and t.outcome.feasible]
    points = [objective_values(t.outcome, names, lower) for t in feasible if t.outcome]
    front = [feasible[i] for i in pareto_front(points)]
    files = write_pareto_outputs(out, search, names, lower, trials, front, runner, seed)
    if cache is not None:
        cache.remove()
    return ParetoResult(out, names, trials, front, runner.candidates_per_minute, files)


def _open_study(
    out: Path, search: Search, seed: int, objectives: int, resume: bool
) -> optuna.Study:
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{(out / STUDY_FILE).resolve()}"
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY,
        directions=["maximize"] * objectives,
        load_if_exists=resume,
    )
    if not resume:
        study.set_user_attr("digest", search.digest)
        study.set_user_attr("seed", seed)
        (out / "search.yml").write_text(search.path.read_text())
        return study
    if study.user_attrs.get("digest") != search.digest:
        raise SearchError(
            f"--resume: the search file '{search.path}' differs from the one the study in "
            f"'{out}' began with; start a new folder"
        )
    if study.user_attrs.get("seed") != seed:
        raise SearchError(
            f"--resume: the study began with seed {study.user_attrs.get('seed')}, not {seed}"
        )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    return study


def _sampler(name: str, seed: int, population: int) -> optuna.samplers.BaseSampler:
    import optuna

    def violation(frozen: optuna.trial.FrozenTrial) -> list[float]:
        return [float(frozen.user_attrs.get("violation", 0.0))]

    # optuna 4 takes a function; optuna 5 reads what Trial.set_constraint stored
    constraints = None if hasattr(optuna.trial.Trial, "set_constraint") else violation
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            population_size=population, seed=seed, constraints_func=constraints
        )
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(
            population_size=population, seed=seed, constraints_func=constraints
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=population, constraints_func=constraints
        )
    return optuna.samplers.RandomSampler(seed=seed)


class _ParetoRunner:
    """Evaluates candidates and tells the study one value per objective."""

    def __init__(
        self,
        search: Search,
        objective: Objective,
        study: optuna.Study,
        seed: int,
        options: SearchOptions,
        names: list[str],
        lower: list[bool],
        task_vectors: TaskVectorCache | None,
    ) -> None:
        self.search = search
        self.objective = objective
        self.study = study
        self.seed = seed
        self.options = options
        self.names = names
        self.lower = lower
        self.task_vectors = task_vectors
        self.evaluated = 0
        self.seconds = 0.0

    @property
    def candidates_per_minute(self) -> float:
        return 60.0 * self.evaluated / self.seconds if self.seconds else 0.0

    def finished(self) -> dict[int, Trial]:
        from optuna.trial import TrialState

        trials: dict[int, Trial] = {}
        for frozen in self.study.get_trials(deepcopy=False):
            attrs = frozen.user_attrs
            if "slot" not in attrs:
                continue
            if frozen.state == TrialState.COMPLETE:
                outcome: Outcome | None = outcome_from(attrs)
            elif frozen.state == TrialState.FAIL and "error" in attrs:
                outcome = None
            else:
                continue
            trials[attrs["slot"]] = Trial(
                attrs["slot"],
                dict(frozen.params),
                attrs["config"],
                outcome,
                float(attrs.get("seconds", 0.0)),
                attrs.get("error"),
            )
        return trials

    def candidate(self, trial: optuna.trial.Trial, slot: int) -> Trial:
        from optuna.trial import TrialState

        from alloykit.pipeline import MergeOptions, merge_in_memory

        config = self.search.space.config(trial.params)
        started = time.perf_counter()
        trial.set_user_attr("slot", slot)
        trial.set_user_attr("config", config)
        outcome: Outcome | None = None
        error = None
        try:
            merged = merge_in_memory(
                config,
                MergeOptions(
                    device=self.options.device,
                    seed=trial_seed(self.seed, slot),
                    threads=self.options.threads,
                ),
                task_vectors=self.task_vectors,
            )
            outcome = self.objective.score(merged)
        except AlloyError as e:
            error = str(e)
        seconds = time.perf_counter() - started
        trial.set_user_attr("seconds", seconds)
        if outcome is not None:
            trial.set_user_attr("score", outcome.score)
            trial.set_user_attr("tasks", outcome.tasks)
            trial.set_user_attr("violation", outcome.violation)
            if hasattr(trial, "set_constraint"):
                trial.set_constraint("min_score", outcome.violation)
            self.study.tell(trial, objective_values(outcome, self.names, self.lower))
        else:
            trial.set_user_attr("error", error)
            self.study.tell(trial, state=TrialState.FAIL)
        self.evaluated += 1
        self.seconds += seconds
        return Trial(slot, dict(trial.params), config, outcome, seconds, error)


# --------------------------------------------------------------------------- outputs


def pareto_csv(front: list[Trial], names: list[str], lower: list[bool], search: Search) -> str:
    """The front as a table: trial, each objective's score, each parameter, the recipe file."""
    params = search.space.names
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", *names, *params, "recipe"])
    for t in front:
        assert t.outcome is not None
        writer.writerow(
            [
                t.slot,
                *[repr(t.outcome.tasks[n]) for n in names],
                *[t.params.get(p, "") for p in params],
                f"{PARETO_FOLDER}/trial_{t.slot}.yml",
            ]
        )
    return buffer.getvalue()


def write_pareto_outputs(
    out: Path,
    search: Search,
    names: list[str],
    lower: list[bool],
    trials: list[Trial],
    front: list[Trial],
    runner: _ParetoRunner,
    seed: int,
) -> list[str]:
    """pareto.csv, pareto/trial_N.yml, pareto.png, trials.csv and summary.json."""
    folder = out / PARETO_FOLDER
    staging = out / f".{PARETO_FOLDER}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for t in front:
        (staging / f"trial_{t.slot}.yml").write_text(best_recipe(t, search))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    files = [f"{PARETO_FOLDER}/"]
    _atomic(out / "pareto.csv", pareto_csv(front, names, lower, search))
    _atomic(out / "trials.csv", trials_csv(trials, search))
    files += ["pareto.csv", "trials.csv"]
    summary = {
        "search": str(search.path),
        "optimiser": search.spec.optimiser.name,
        "seed": seed,
        "objectives": [
            {"task": n, "direction": "minimise" if low else "maximise"}
            for n, low in zip(names, lower, strict=True)
        ],
        "trials": len(trials),
        "feasible": sum(1 for t in trials if t.outcome is not None and t.outcome.feasible),
        "front": [
            {"slot": t.slot, "params": t.params, "tasks": t.outcome.tasks}
            for t in front
            if t.outcome is not None
        ],
        "candidates_per_minute": round(runner.candidates_per_minute, 2),
    }
    _atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    files.append("summary.json")
    if plot_front(trials, front, names, lower, out / "pareto.png"):
        files.append("pareto.png")
    return files


def plot_front(
    trials: list[Trial], front: list[Trial], names: list[str], lower: list[bool], path: Path
) -> bool:
    """A PNG of every candidate's scores with the front marked, a panel per objective pair."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    figure, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    on_front = {t.slot for t in front}
    for panel, (i, j) in zip(axes[0], pairs, strict=True):
        for feasible, marker, label in ((True, "o", "candidate"), (False, "x", "infeasible")):
            points = [
                (t.outcome.tasks[names[i]], t.outcome.tasks[names[j]])
                for t in trials
                if t.outcome is not None
                and t.outcome.feasible == feasible
                and t.slot not in on_front
            ]
            if points:
                panel.plot(*zip(*points, strict=True), marker, color="0.65", ms=4, label=label)
        points = sorted(
            (t.outcome.tasks[names[i]], t.outcome.tasks[names[j]])
            for t in front
            if t.outcome is not None
        )
        if points:
            panel.plot(*zip(*points, strict=True), "o-", color="C3", ms=6, label="Pareto front")
        arrow = {True: " (lower is better)", False: ""}
        panel.set_xlabel(names[i] + arrow[lower[i]])
        panel.set_ylabel(names[j] + arrow[lower[j]])
        panel.legend(loc="best", fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return True


def front_table(result: ParetoResult) -> list[list[str]]:
    """The front as rows of text for the CLI: trial, then each objective's score."""
    rows = [["trial", *result.objectives]]
    for t in result.front:
        assert t.outcome is not None
        rows.append([str(t.slot), *[f"{t.outcome.tasks[n]:.4f}" for n in result.objectives]])
    return rows
