"""The multi-task merge table: experts, a linear-probe baseline and merges, scored per task.

Hyper-parameters of every method are chosen on the validation splits (mean accuracy over the
tasks); the test split is read once per reported cell, which :func:`run_table` asserts.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alloykit.demo.core import (
    DemoError,
    Scorer,
    TrainConfig,
    base_model_path,
    expert_dir,
    get_experts,
    linear_probe,
    load_state,
    mean,
    merge_backbones,
    strip_backbone,
)
from alloykit.demo.data import TASK_NAMES, Task, build_task, make_task

Grid = Mapping[str, Sequence[Any]]


@dataclass
class Row:
    """One row of the table: accuracy per task on test, the chosen parameters."""

    name: str
    acc: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    val_mean: float = math.nan
    note: str = ""

    def normalised(self, experts: Mapping[str, float]) -> dict[str, float]:
        """Accuracy divided by each task's own expert's (in %)."""
        return {t: 100.0 * a / experts[t] for t, a in self.acc.items()}


@dataclass
class Table:
    """The result: expert accuracies on their own tasks, the rows, timings."""

    tasks: list[str]
    rows: list[Row]
    expert_acc: dict[str, float]
    seconds: dict[str, float]
    test_reads: dict[str, int]
    cached_cells: list[str] = field(default_factory=list)  # "label / task" read by an earlier run


@dataclass(frozen=True)
class RecipeSearch:
    """A recipe search on the validation splits: ``method`` with ``ranges`` ``{param: (low,
    high)}`` for its global parameters (and ``density``, given to every expert) and, with
    ``weights``, one weight per expert in that range; ``trials`` points chosen by Optuna's TPE
    sampler (the sampler of ``alloykit search --optimizer tpe``) seeded with ``seed``, the
    objective the mean validation accuracy; the best point is scored on test once."""

    method: str
    ranges: Mapping[str, tuple[float, float]]
    weights: tuple[float, float] | None = None
    trials: int = 30
    seed: int = 0


def grid_points(grid: Grid) -> list[dict[str, Any]]:
    """Every combination of a grid ``{param: [values]}`` (one empty point for no grid)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def load_tasks(names: Sequence[str], seed: int, per_label: int) -> list[Task]:
    """The tasks, built from the installed packages' files (about a second for all four; not
    cached, so a new version of the data is never shadowed by an old copy)."""
    return [build_task(name, seed, per_label) for name in names]


def _probe_path(cache: Path, task: Task, train: TrainConfig) -> Path:
    return expert_dir(cache, task, train).with_suffix(".probe.safetensors")


def _cached_probe(cache: Path, task: Task, base: Path, train: TrainConfig) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    path = _probe_path(cache, task, train)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(linear_probe(task, base, train), str(path))
    return load_file(str(path))


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def calibration_section(cache: Path, tasks: Sequence[Task], samples: int = 128) -> dict[str, Any]:
    """The ``calibration:`` section of the data-aware merges (regmean, aim): every task's train
    texts shuffled together with a fixed seed (validation and test are never used), written to
    ``cache/calibration.jsonl``; ``samples`` blocks of 64 tokens."""
    texts = [text for task in tasks for text, _ in task.train]
    random.Random(0).shuffle(texts)
    path = cache / f"calibration-{_digest(texts)}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(path)
    return {
        "data": str(path),
        "samples": samples,
        "sequence_length": 64,
        "batch_size": 16,
        "cache_dir": str(cache / "calibration"),
    }


def run_table(
    cache: Path,
    methods: Mapping[str, Grid],
    pair_methods: Mapping[str, Grid] | None = None,
    task_names: Sequence[str] = TASK_NAMES,
    train: TrainConfig | None = None,
    per_label: int = 100,
    seed: int = 0,
    probe: bool = True,
    base_row: bool = True,
    cross: bool = True,
    workers: int = 1,
    log: Callable[[str], None] = print,
    on_row: Callable[[Table], None] | None = None,
    tasks: Sequence[Task] | None = None,
    base: Path | None = None,
    searches: Mapping[str, RecipeSearch] | None = None,
) -> Table:
    """Build or reuse the experts, then score the baseline, the experts and every method.

    ``tasks`` and ``base`` replace the PyPI tasks and all-MiniLM-L6-v2 (the tests use toys).
    ``methods`` merge all experts; ``pair_methods`` merge each pair of experts and report the
    pair with the best validation mean. ``cross`` adds each expert's row on every task;
    ``base_row`` the base's backbone under each task's expert head (with ``probe``).
    ``workers`` experts are fine-tuned side by side when they are not cached. ``searches``
    adds one row per :class:`RecipeSearch` (its label ``search: NAME``). ``on_row`` gets
    the table so far after each method's row (a long run can be watched, or cut short).

    Validation scores are cached in ``cache/validation``, keyed by the method, its grid point,
    the experts (whose folder names hash their data and settings), the base and the scoring
    settings: a second run merges each method once, at its chosen point, and reads test once.
    The test cells of the rows that depend only on the cache (experts, probes, the base) are
    kept in ``cache/test`` the same way: a second run scores only the merges on test
    (``Table.cached_cells`` lists the cells an earlier run read).
    """
    train = train or TrainConfig()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    if tasks is None:
        tasks = load_tasks(task_names, seed, per_label)
    if base is None:
        base = base_model_path()
    seconds["data"] = time.perf_counter() - start
    t0 = time.perf_counter()
    experts = get_experts(cache, tasks, base, train, workers, log)
    seconds["experts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    states = {name: load_state(folder) for name, folder in experts.items()}
    heads = {
        n: {k: v for k, v in s.items() if k.startswith("classifier.")} for n, s in states.items()
    }
    scorer = Scorer(base, tasks, heads, train.max_length, threads=train.threads)
    names = [t.name for t in tasks]
    rows: list[Row] = []

    def test_row(label: str, backbone: Mapping[str, Any], **kw: Any) -> Row:
        row = Row(label, scorer.score_all(label, backbone, "test"), **kw)
        rows.append(row)
        return row

    cached_cells: list[str] = []

    def fixed_row(
        label: str, backbone: Callable[[], Mapping[str, Any]], heads: Mapping[str, str]
    ) -> dict[str, float]:
        # test accuracy of a backbone that depends only on the cache (an expert, the base)
        # under heads[task]: read from cache/test when an earlier run scored that cell, so a
        # cached run scores only the merges. The key names the backbone and head by their
        # files (which hash the data and settings) and the scoring settings.
        out: dict[str, float] = {}
        loaded = False
        for task, head in heads.items():
            key = [label, head_files[head], task, str(base), train, scorer.batch_size]
            path = cache / "test" / f"{_digest(key)}.json"
            if path.exists():
                out[task] = float(json.loads(path.read_text())["accuracy"])
                cached_cells.append(f"{label} / {task}")
                continue
            if not loaded:
                scorer.load(backbone())
                loaded = True
            out[task] = scorer.accuracy(label, head, "test")
            _write_json(path, {"key": repr(key), "accuracy": out[task]})
        return out

    head_files = {name: experts[name].name for name in names}
    expert_acc: dict[str, float] = {}
    for name in names:
        label = f"expert: {name}"
        own = {task: task for task in (names if cross else [name])}
        acc = fixed_row(label, functools.partial(strip_backbone, states[name]), own)
        if cross:
            rows.append(Row(label, acc))
        expert_acc[name] = acc[name]
    if probe:
        base_state: dict[str, Any] = {}

        def base_backbone() -> dict[str, Any]:
            if not base_state:
                base_state.update(strip_backbone(load_state(base)))
            return base_state

        for task in tasks:
            probe_head = f"probe:{task.name}"
            path = _probe_path(cache, task, train)
            scorer.heads[probe_head] = _cached_probe(cache, task, base, train)
            scorer.data[(probe_head, "test")] = scorer.data[(task.name, "test")]
            head_files[probe_head] = path.name
        probe_acc = fixed_row(
            "linear probe", base_backbone, {t.name: f"probe:{t.name}" for t in tasks}
        )
        rows.insert(0, Row("linear probe (frozen base)", probe_acc))
        if base_row:
            unmerged = fixed_row("base", base_backbone, {name: name for name in names})
            rows.insert(1, Row("base + experts' heads (no merge)", unmerged))
    seconds["baselines"] = time.perf_counter() - t0

    calibration = calibration_section(cache, tasks)

    def merge(method: str, point: Mapping[str, Any], members: Sequence[str]) -> Any:
        folders = [experts[m] for m in members]
        return merge_backbones(method, base, folders, point, seed, train.threads, calibration)

    def validate(
        method: str, point: Mapping[str, Any], members: Sequence[str]
    ) -> tuple[float, Any]:
        # mean validation accuracy of one merge (cached), and the merge when it was made
        key = [method, dict(point), [experts[m].name for m in members], str(base), seed, train]
        path = cache / "validation" / f"{_digest(key)}.json"
        if path.exists():
            return float(json.loads(path.read_text())["val_mean"]), None
        merged = merge(method, point, members)
        scores = scorer.score_all(f"val:{method}", merged, "validation")
        val = mean(list(scores.values()))
        _write_json(path, {"key": repr(key), "val_mean": val, "scores": scores})
        return val, merged

    def search(
        method: str, grid: Grid, members: Sequence[str]
    ) -> tuple[float, dict[str, Any], Any]:
        best: tuple[float, dict[str, Any], Any] = (-1.0, {}, None)
        for point in grid_points(grid):
            val, merged = validate(method, point, members)
            log(f"  {method} {point} {members if len(members) < len(names) else ''}: val {val:.1f}")
            if val > best[0]:
                best = (val, point, merged)
        if best[2] is None:  # the winner's score came from the cache: merge it once
            best = (best[0], best[1], merge(method, best[1], members))
        return best

    for method, grid in methods.items():
        t0 = time.perf_counter()
        try:
            val, point, merged = search(method, grid, names)
        except Exception as err:  # a method that cannot merge these models is reported, not fatal
            rows.append(Row(method, {}, note=f"failed: {str(err).splitlines()[0][:120]}"))
            log(f"  {method} failed: {err}")
            continue
        test_row(method, merged, params=point, val_mean=val)
        seconds[method] = time.perf_counter() - t0
        if on_row is not None:
            on_row(Table(names, list(rows), expert_acc, dict(seconds), {}))
    for method, grid in (pair_methods or {}).items():
        t0 = time.perf_counter()
        best: tuple[float, dict[str, Any], Any, tuple[str, ...]] = (-1.0, {}, None, ())
        for pair in itertools.combinations(names, 2):
            val, point, merged = search(method, grid, pair)
            if val > best[0]:
                best = (val, point, merged, pair)
        test_row(
            f"{method} (best pair)",
            best[2],
            params=best[1],
            val_mean=best[0],
            note=" + ".join(best[3]),
        )
        seconds[method] = time.perf_counter() - t0
    for label, spec in (searches or {}).items():
        t0 = time.perf_counter()

        def score(point: dict[str, Any], method: str = spec.method) -> float:
            return validate(method, point, names)[0]

        val, point = recipe_search(spec, len(names), score, log)
        test_row(
            f"search: {label}",
            merge(spec.method, point, names),
            params=rounded(point),
            val_mean=val,
            note=f"TPE, {spec.trials} trials on validation",
        )
        seconds[f"search: {label}"] = time.perf_counter() - t0
    # every reported cell's test split was read exactly once
    test_reads = {k: v for k, v in scorer.read_counts.items() if k[2] == "test"}
    for (label, _task, _split), count in test_reads.items():
        if count != 1:
            raise DemoError(f"test split read {count} times for {label}")
    if any(key[0].startswith("val:") for key in test_reads):
        raise DemoError("a validation search read the test split")
    seconds["total"] = time.perf_counter() - start
    return Table(
        names,
        rows,
        expert_acc,
        seconds,
        {" / ".join(k[:2]): v for k, v in test_reads.items()},
        cached_cells,
    )


def rounded(point: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3)
        for k, v in point.items()
    }


def recipe_search(
    spec: RecipeSearch,
    count: int,
    score: Callable[[dict[str, Any]], float],
    log: Callable[[str], None],
) -> tuple[float, dict[str, Any]]:
    """The best point of ``spec`` over ``count`` experts and its validation score (``score``
    maps a point to it)."""
    try:
        import optuna
    except ImportError:
        raise DemoError(
            "the recipe-search row needs optuna: pip install 'alloykit[search]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec.seed)
    )

    def objective(trial: Any) -> float:
        point: dict[str, Any] = {
            name: trial.suggest_float(name, low, high) for name, (low, high) in spec.ranges.items()
        }
        if spec.weights is not None:
            point["weights"] = [
                trial.suggest_float(f"weight{i}", *spec.weights) for i in range(count)
            ]
        value = score(point)
        log(f"  search {spec.method} {rounded(point)}: val {value:.1f}")
        return value

    study.optimize(objective, n_trials=spec.trials)
    best = study.best_trial
    point = {name: best.params[name] for name in spec.ranges}
    if spec.weights is not None:
        point["weights"] = [best.params[f"weight{i}"] for i in range(count)]
    assert best.value is not None
    return float(best.value), point


def format_table(table: Table) -> str:
    """The table as Markdown: accuracy per task, mean, normalised per task and mean."""
    tasks = table.tasks
    head = (
        "| model | "
        + " | ".join(tasks)
        + " | mean acc | "
        + " | ".join(f"{t} norm" for t in tasks)
        + " | mean norm | chosen on validation |"
    )
    lines = [head, "|" + "---|" * (2 * len(tasks) + 4)]
    for row in table.rows:
        if not row.acc:
            lines.append(
                f"| {row.name} | " + " | ".join([""] * (2 * len(tasks) + 2)) + f" | {row.note} |"
            )
            continue
        norm = row.normalised(table.expert_acc)
        params = ", ".join(f"{k}={v}" for k, v in row.params.items())
        extra = "; ".join(x for x in (params, row.note) if x)
        lines.append(
            f"| {row.name} | "
            + " | ".join(f"{row.acc[t]:.1f}" for t in tasks)
            + f" | {mean([row.acc[t] for t in tasks]):.1f} | "
            + " | ".join(f"{norm[t]:.1f}" for t in tasks)
            + f" | {mean([norm[t] for t in tasks]):.1f} | {extra} |"
        )
    return "\n".join(lines)


def plot_table(table: Table, path: Path) -> Path:
    """Grouped bars of normalised accuracy per task for every merge row (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DemoError("the bar chart needs matplotlib: pip install 'alloykit[plots]'") from None
    rows = [r for r in table.rows if r.acc and not r.name.startswith("expert:")]
    fig, ax = plt.subplots(figsize=(2 + 1.4 * len(rows), 4))
    width = 0.8 / len(table.tasks)
    for i, task in enumerate(table.tasks):
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [r.normalised(table.expert_acc)[task] for r in rows],
            width,
            label=task,
        )
    ax.axhline(100, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r.name.split(" (")[0] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("accuracy / own expert's (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "RecipeSearch",
    "Row",
    "Table",
    "format_table",
    "grid_points",
    "load_tasks",
    "make_task",
    "plot_table",
    "run_table",
]
