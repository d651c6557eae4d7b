"""Layer-path (data-flow space) search: which layers, of which models, in which order.

After Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes"
(arXiv:2403.13187), section 3.2: the weights stay as they are and the *inference path* is
searched. The layers of the M source models are laid out one model after another, and that
sequence is repeated r times: T = r · (L_1 + ... + L_M) slots. An indicator ``I ∈ [-1, 1]^T``
says which slots run: slot t is on the path iff ``I_t > 0``, in slot order. The path becomes a
``passthrough`` recipe: consecutive slots of one model with consecutive layers form one slice
(``layer_range``), so ``alloykit merge best.yml OUT`` builds the model. Non-layer tensors
(embeddings, final norm, LM head) come from the first slice's model, MergeKit's rule.

Left out: the paper's scaling matrix W, which rescales the hidden state where the path crosses
from one model's layer to another's (a passthrough recipe has no place for a learned
inter-layer scale, and plain transformers models could not load one). The indicator is what
is searched, with any of the search's optimisers (CMA-ES, as in the paper, TPE, GP, random).

PS+DFS (the paper's parameter-space merge followed by a data-flow search): a
``layer_path.models`` entry may be ``{recipe: best.yml}``, e.g. the best recipe of an earlier
``alloykit search``: it is merged once into ``OUT/sources/NAME`` (kept; reused on ``--resume``)
and its layers take part like a model's.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alloykit.search.objective import Outcome
from alloykit.search.space import Dimension, SearchError, Space
from alloykit.search.study import (
    SearchOptions,
    SearchResult,
    Trial,
    _objective,
    _open_study,
    _prepare_folder,
    _Runner,
    _test_once,
    best_trial,
    require_libraries,
    stored_trials,
    write_outputs,
)

if TYPE_CHECKING:
    import optuna

    from alloykit.search.spec import Search, SearchSpec

SOURCES_FOLDER = "sources"
RECIPE_PREFIX = "recipe:"  # a source still to be merged: "recipe:/abs/path/best.yml"


@dataclass(frozen=True)
class LayerPathSpace(Space):
    """The indicator dimensions of a layer-path search and how they become a recipe.

    ``sources`` are the source models (folders, or ``recipe:FILE`` before those are merged),
    ``slots`` the (source index, layer) of each slot, in order.
    """

    sources: tuple[str, ...] = ()
    slots: tuple[tuple[int, int], ...] = ()

    def path(self, params: Mapping[str, Any]) -> list[tuple[int, int]]:
        """The slots on the path: those whose indicator is above zero, in slot order."""
        return [
            slot
            for dim, slot in zip(self.dimensions, self.slots, strict=True)
            if params[dim.name] > 0
        ]

    def config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The passthrough recipe of the path (no ``slices`` when the path is empty)."""
        return path_recipe(self.template, self.sources, self.path(params))


def path_recipe(
    template: Mapping[str, Any], sources: tuple[str, ...], path: list[tuple[int, int]]
) -> dict[str, Any]:
    """A passthrough recipe running ``path`` ((source, layer) pairs) in order.

    Runs of consecutive layers of one source become one slice.

    Example:
        >>> path_recipe({}, ("a", "b"), [(0, 0), (0, 1), (1, 2), (1, 3), (0, 1)])["slices"]
        ... # doctest: +NORMALIZE_WHITESPACE
        [{'sources': [{'model': 'a', 'layer_range': [0, 2]}]},
         {'sources': [{'model': 'b', 'layer_range': [2, 4]}]},
         {'sources': [{'model': 'a', 'layer_range': [1, 2]}]}]
    """
    runs: list[list[int]] = []  # [source, start, end)
    for source, layer in path:
        if runs and runs[-1][0] == source and runs[-1][2] == layer:
            runs[-1][2] = layer + 1
        else:
            runs.append([source, layer, layer + 1])
    recipe = {k: v for k, v in template.items() if k not in ("merge_method", "slices", "models")}
    recipe["merge_method"] = "passthrough"
    recipe["slices"] = [
        {"sources": [{"model": sources[s], "layer_range": [start, end]}]} for s, start, end in runs
    ]
    return recipe


def layer_path_space(
    spec: SearchSpec, template: dict[str, Any], folder: Path, where: str
) -> LayerPathSpace:
    """The space of a search file's ``layer_path:`` (its models' layers counted, not read)."""
    layer_path = spec.layer_path
    assert layer_path is not None
    if spec.space:
        raise SearchError(
            f"{where}: space: a layer_path search searches the path only; search the merge's "
            "parameters first (an ordinary search) and give its best.yml as {recipe: ...}"
        )
    if spec.optimiser.name == "greedy_soup" or spec.objective.pareto:
        raise SearchError(
            f"{where}: layer_path takes the optimisers random, tpe, gp or cmaes, one objective"
        )
    sources: list[str] = []
    counts: list[int] = []
    for i, entry in enumerate(layer_path.models):
        field = f"{where}: layer_path.models[{i}]"
        if isinstance(entry, str):
            local = folder / entry
            reference = str(local.resolve()) if local.exists() else entry
            sources.append(reference)
            counts.append(_model_layers(reference, field))
        else:
            recipe = folder / entry.recipe
            if not recipe.is_file():
                raise SearchError(f"{field}.recipe: '{entry.recipe}' does not exist")
            sources.append(RECIPE_PREFIX + str(recipe.resolve()))
            counts.append(_recipe_layers(recipe, field))
    slots = tuple(
        (source, layer)
        for _ in range(layer_path.repeats)
        for source, count in enumerate(counts)
        for layer in range(count)
    )
    dimensions = tuple(
        Dimension(
            name=f"slot{t}:m{source}.layer{layer}", path=("layer_path", t), low=-1.0, high=1.0
        )
        for t, (source, layer) in enumerate(slots)
    )
    return LayerPathSpace(template, dimensions, tuple(sources), slots)


def _model_layers(reference: str, field: str) -> int:
    from alloykit.architecture import layer_count
    from alloykit.errors import AlloyError
    from alloykit.io.checkpoint import open_checkpoint
    from alloykit.io.hub import resolve_model

    try:
        with open_checkpoint(Path(resolve_model(reference, None))) as checkpoint:
            count = layer_count(checkpoint.config, checkpoint.tensors)[0]
    except AlloyError as e:
        raise SearchError(f"{field}: {e}") from e
    if count < 1:
        raise SearchError(f"{field}: '{reference}' has no layer stack to take layers from")
    return count


def _recipe_layers(recipe: Path, field: str) -> int:
    from alloykit.architecture import layer_count
    from alloykit.errors import AlloyError
    from alloykit.pipeline import plan_merge

    try:
        plan = plan_merge(recipe)
    except AlloyError as e:
        raise SearchError(f"{field}.recipe: {e}") from e
    count = layer_count(plan.config, [job.output for job in plan.jobs])[0]
    if count < 1:
        raise SearchError(f"{field}.recipe: its merge has no layer stack to take layers from")
    return count


def merge_sources(space: LayerPathSpace, out: Path, options: SearchOptions) -> LayerPathSpace:
    """The space with each ``recipe:`` source merged into ``OUT/sources/NAME`` (once)."""
    from alloykit.pipeline import MergeOptions, merge

    sources = []
    for i, source in enumerate(space.sources):
        if not source.startswith(RECIPE_PREFIX):
            sources.append(source)
            continue
        recipe = Path(source.removeprefix(RECIPE_PREFIX))
        target = out / SOURCES_FOLDER / f"{i}-{recipe.stem}"
        if not (target / "config.json").is_file():  # merged folders appear only when complete
            merge(
                recipe,
                target,
                MergeOptions(
                    device=options.device, seed=0, threads=options.threads, overwrite=True
                ),
            )
        sources.append(str(target.resolve()))
    return replace(space, sources=tuple(sources))


class _LayerRunner(_Runner):
    """The search's runner, with an empty path recorded as a failed candidate."""

    def _candidate(self, trial: optuna.trial.Trial, slot: int) -> Trial:
        space = self.search.space
        assert isinstance(space, LayerPathSpace)
        if space.path(trial.params):
            return super()._candidate(trial, slot)
        config = space.config(trial.params)

        def empty() -> Outcome:
            raise SearchError("the path is empty: every slot's indicator is at or below 0")

        return self.evaluate(trial, slot, config, empty)


def run_layer_path_search(
    search_file: str | Path,
    out: str | Path,
    options: SearchOptions | None = None,
    *,
    on_trial: Callable[[Trial, int], None] | None = None,
) -> SearchResult:
    """Search the layer path of ``search_file`` (with a ``layer_path:`` section).

    The study, resume, budget, seeds, the test split scored once and the outputs are those of
    :func:`alloykit.search.run_search`; ``best.yml`` is a passthrough recipe.

    Example:
        >>> result = run_layer_path_search("layers.yml", "runs/l1")  # doctest: +SKIP
        >>> result.best.config["slices"]  # doctest: +SKIP
    """
    require_libraries()
    import optuna

    from alloykit.search.spec import load_search

    options = options or SearchOptions()
    search = load_search(search_file)
    if not isinstance(search.space, LayerPathSpace):
        raise SearchError(f"search file '{search.path}': no layer_path section")
    settings = search.spec.optimiser
    budget = options.budget or settings.budget
    time_limit = options.time_limit or settings.time_limit
    seed = settings.seed if options.seed is None else options.seed
    out = Path(out)
    created = _prepare_folder(out, options.resume)
    try:
        search = _with_space(search, merge_sources(search.space, out, options))
        _check_stack(search)
        objective = _objective(search, options)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = _open_study(out, search, seed, options.resume)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    # passthrough takes no task vectors: nothing to cache
    runner = _LayerRunner(search, objective, study, seed, options, on_trial, budget)
    deadline = time.monotonic() + time_limit if time_limit else math.inf
    if settings.name == "cmaes":
        runner.run_cmaes(budget, deadline)
    else:
        runner.run_sequential(settings.name, budget, deadline)
    trials = stored_trials(study)
    best = best_trial(trials)
    test = _test_once(study, objective, best, seed, options) if best is not None else None
    files = write_outputs(out, search, trials, best, test, runner, options, seed)
    return SearchResult(out, trials, best, test, runner.candidates_per_minute, files)


def _check_stack(search: Search) -> None:
    """Plan the path through every slot (no tensor is read): models whose layers cannot be
    stacked (other hidden sizes, other architectures) are refused before the first trial."""
    from alloykit.errors import AlloyError
    from alloykit.pipeline import plan_merge

    space = search.space
    assert isinstance(space, LayerPathSpace)
    every = {dim.name: 1.0 for dim in space.dimensions}
    where = f"search file '{search.path}': layer_path"
    try:
        plan = plan_merge(space.config(every))
    except AlloyError as e:
        raise SearchError(f"{where}: {e}") from e
    layouts = {label: _layer_layout(folder) for label, folder in plan.models.items()}
    first, expected = next(iter(layouts.items()))
    for label, layout in layouts.items():
        if layout != expected:
            raise SearchError(
                f"{where}: the layers of '{label}' do not fit those of '{first}' (other tensors "
                "or shapes per layer); stack layers of models of one architecture and size"
            )


def _layer_layout(folder: Path) -> dict[str, tuple[int, ...]]:
    """One model's per-layer tensors (name within the layer -> shape), from its first layer."""
    from alloykit.architecture import split_layer_name
    from alloykit.io.checkpoint import open_checkpoint

    layout: dict[str, tuple[int, ...]] = {}
    with open_checkpoint(folder) as checkpoint:
        for name, info in checkpoint.tensors.items():
            parts = split_layer_name(name)
            if parts is not None and parts.index == 0:
                layout[parts.rest] = tuple(info.shape)
    return layout


def _with_space(search: Search, space: LayerPathSpace) -> Search:
    return replace(search, space=space)
