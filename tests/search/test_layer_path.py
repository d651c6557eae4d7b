"""Layer-path search: a passthrough stack of layers of both parents, found by search.

The parents are a base model with different layers destroyed: ``a`` keeps the base's layer 0
and has a random layer 1, ``b`` the reverse. The task's answers are the base model's choices on
items where both parents choose otherwise, so each parent scores 0 and the stack
``a.layer0 -> b.layer1`` (the base itself) scores 1: only layers of both parents solve it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from alloykit.config import load_config
from alloykit.evaluation import EvalOptions, evaluate
from alloykit.evaluation.tasks import load_task
from alloykit.search import SearchError, SearchOptions, load_search
from alloykit.search.layer_path import LayerPathSpace, path_recipe, run_layer_path_search
from alloykit.toymodels import ToySpec, make_family, save_checkpoint
from tests.search.problem import _preferences, _word

SPEC = ToySpec(num_hidden_layers=2)
ITEMS = 24


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layer-path")
    base = make_family(root / "models", SPEC, finetunes=0, seed=0)["base"]
    tensors = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name, broken in (("a", 1), ("b", 0)):
        changed = {
            key: (rng.standard_normal(value.shape) * 0.5).astype(value.dtype)
            if key.startswith(f"model.layers.{broken}.") and value.ndim == 2
            else value
            for key, value in tensors.items()
        }
        save_checkpoint(root / "models" / name, SPEC, changed)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 128, (2000, 3), generator=generator)
    choices = torch.randint(3, 128, (2000, 2), generator=generator)
    prefs = {n: _preferences(root / "models" / n, prompts, choices) for n in ("base", "a", "b")}
    chosen = ((prefs["a"] != prefs["base"]) & (prefs["b"] != prefs["base"])).nonzero().flatten()
    assert len(chosen) >= 2 * ITEMS
    rows = [
        {
            "text": " ".join(_word(t) for t in prompts[i].tolist()),
            "options": [_word(t) for t in choices[i].tolist()],
            "label": int(prefs["base"][i]),
        }
        for i in chosen.tolist()[: 2 * ITEMS]
    ]
    for split, part in (("validation", rows[:ITEMS]), ("test", rows[ITEMS:])):
        (root / f"stack_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "stack.yml").write_text(
        "name: stack\ndata: {validation: stack_validation.jsonl, test: stack_test.jsonl}\n"
        'prompt: "{{ text }}"\nchoices: options\ntarget: label\nmetric: multiple_choice\n'
    )
    return root


def _search_file(root: Path, name: str, optimiser: str = "tpe", budget: int = 24) -> Path:
    path = root / name
    path.write_text(
        "layer_path:\n  models: [models/a, models/b]\n  repeats: 2\n"
        "objective: {tasks: [{task: stack.yml}]}\n"
        f"optimiser: {{name: {optimiser}, budget: {budget}, seed: 0, startup_trials: 8}}\n"
    )
    return path


def test_a_layer_path_search_beats_both_parents_with_layers_of_both(parents: Path) -> None:
    task = load_task(parents / "stack.yml", split="validation")
    options = EvalOptions(threads=1)
    parent_scores = {
        name: evaluate(str(parents / "models" / name), [task], options).tasks["stack"].value
        for name in ("a", "b")
    }
    assert parent_scores == {"a": 0.0, "b": 0.0}  # by construction

    search_file = _search_file(parents, "layers.yml")
    search = load_search(search_file)
    assert isinstance(search.space, LayerPathSpace)
    assert len(search.space.dimensions) == 2 * (2 + 2)  # r x (L_a + L_b) slots
    out = parents / "layers-run"
    result = run_layer_path_search(search_file, out, SearchOptions(threads=1))
    assert result.best is not None and result.best.outcome is not None
    assert result.best.outcome.score > max(parent_scores.values())
    assert result.best.outcome.score >= 0.9  # a random stack scores about 0.5
    slices = result.best.config["slices"]
    models = {Path(s["sources"][0]["model"]).name for s in slices}
    assert models == {"a", "b"}

    # best.yml is a passthrough recipe alloykit merge takes; the merged model scores the same
    from alloykit.pipeline import MergeOptions, merge

    recipe = load_config(out / "best.yml")
    assert recipe.merge_method == "passthrough"
    merged = merge(recipe, parents / "stacked", MergeOptions(seed=0))
    score = evaluate(str(merged.output), [task], options).tasks["stack"].value
    assert score == result.best.outcome.score
    assert result.test is not None  # the test split, once, for the best
    layers = json.loads((merged.output / "config.json").read_text())["num_hidden_layers"]
    assert layers == sum(
        s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices
    )


def test_path_recipe_joins_runs_of_consecutive_layers() -> None:
    sources = ("x", "y")
    recipe = path_recipe(
        {"dtype": "float32", "merge_method": "ties"},
        sources,
        [(0, 0), (0, 1), (1, 1), (0, 0), (0, 2)],
    )
    assert recipe["merge_method"] == "passthrough" and recipe["dtype"] == "float32"
    ranges = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in recipe["slices"]]
    assert ranges == [("x", [0, 2]), ("y", [1, 2]), ("x", [0, 1]), ("x", [2, 3])]


def test_a_recipe_source_is_merged_once_and_an_empty_path_fails_its_trial(parents: Path) -> None:
    (parents / "ps.yml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {parents / 'models' / 'a'}\n"
        f"    parameters: {{weight: 0.5}}\n  - model: {parents / 'models' / 'b'}\n"
        "    parameters: {weight: 0.5}\n"
    )
    path = parents / "ps_dfs.yml"
    path.write_text(
        "layer_path:\n  models: [{recipe: ps.yml}, models/b]\n"
        "objective: {tasks: [{task: stack.yml}]}\n"
        "optimiser: {name: random, budget: 6, seed: 1}\n"
    )
    out = parents / "ps-dfs-run"
    result = run_layer_path_search(path, out, SearchOptions(threads=1))
    merged = out / "sources" / "0-ps"
    assert (merged / "config.json").is_file()
    sources = {s["sources"][0]["model"] for t in result.trials for s in t.config.get("slices", [])}
    assert sources <= {str(merged.resolve()), str((parents / "models" / "b").resolve())}
    for trial in result.trials:
        if not trial.config["slices"]:
            assert trial.outcome is None and "path is empty" in (trial.error or "")
        else:
            assert trial.outcome is not None


def test_bad_layer_path_files_are_refused(
    parents: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from alloykit import cli

    bad = parents / "bad.yml"
    bad.write_text(
        _search_file(parents, "x.yml").read_text()
        + "space: [{param: parameters.lambda, low: 0, high: 1}]\n"
    )
    with pytest.raises(SearchError, match="searches the path only"):
        load_search(bad)
    missing = parents / "missing.yml"
    missing.write_text(_search_file(parents, "y.yml").read_text().replace("models/b", "models/zz"))
    monkeypatch.setattr(sys, "argv", ["alloykit", "search", str(missing), str(parents / "no")])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    err = capsys.readouterr().err
    assert exit.value.code != 0 and "layer_path.models[1]" in err
    assert len(err.strip().splitlines()) == 1
    assert not (parents / "no").exists()

    wide = ToySpec(num_hidden_layers=2, hidden_size=48, intermediate_size=96)
    make_family(parents / "wide", wide, finetunes=0, seed=0)
    other = parents / "other.yml"
    other.write_text(_search_file(parents, "z.yml").read_text().replace("models/b", "wide/base"))
    with pytest.raises(SearchError, match="do not fit those of"):
        run_layer_path_search(other, parents / "other-run", SearchOptions(threads=1))
    assert not (parents / "other-run").exists()

    good = _search_file(parents, "cli.yml", "random", 3)
    monkeypatch.setattr(sys, "argv", ["alloykit", "search", str(good), str(parents / "cli-run")])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    captured = capsys.readouterr()
    assert exit.value.code == 0, captured.err
    assert "best: trial" in captured.out and "; path " in captured.out
    assert load_config(parents / "cli-run" / "best.yml").merge_method == "passthrough"
