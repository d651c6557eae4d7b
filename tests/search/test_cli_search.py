"""``alloykit search``: the outputs, greedy soup, GP, and one-line errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

import alloykit
from alloykit.evaluation import EvalOptions
from alloykit.search import SearchError, SearchOptions, load_search, run_search
from tests.helpers import run_cli
from tests.search.problem import write_search


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str | Path
) -> tuple[int, str, str]:
    """Run ``alloykit ARGS`` in this process (the CLI's own error boundary included)."""
    from alloykit import cli

    monkeypatch.setattr(sys, "argv", ["alloykit", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    captured = capsys.readouterr()
    return int(exit.value.code or 0), captured.out, captured.err


def test_gp_search_writes_a_recipe_trials_a_plot_and_the_model(
    problem: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    search_file = write_search(problem, "gp", 8)
    search_file.write_text(
        search_file.read_text().replace("seed: 0}", "seed: 0, startup_trials: 4}")
    )
    out = problem / "gp"
    code, stdout, stderr = _cli(
        monkeypatch, capsys, "search", search_file, out, "--seed", "3", "-j", "1", "--save-model"
    )
    assert code == 0, stderr
    assert "best: trial" in stdout and "candidates/minute" in stdout
    assert stdout.count("  trial ") == 8
    for name in (
        "study.db",
        "search.yml",
        "best.yml",
        "trials.csv",
        "summary.json",
        "progress.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "model" / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["trials"] == 8
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["trial"]) for r in rows] == list(range(8))
    assert max(float(r["score"]) for r in rows) == summary["best"]["validation"]["score"]
    # best.yml is a recipe alloykit merge takes, and it scores what the search recorded
    results = alloykit.evaluate(out / "best.yml", [problem / "a.yml", problem / "b.yml"])
    assert results.recipe_hash is not None
    # the task files' own split is test: the recorded test scores are those of best.yml
    assert summary["best"]["test"]["tasks"] == {"a": results["a"], "b": results["b"]}
    model = alloykit.evaluate(out / "model", [problem / "a.yml"], EvalOptions(threads=1))
    assert model["a"] == results["a"]


def test_greedy_soup_scores_soups_and_writes_the_chosen_average(problem: Path) -> None:
    (problem / "soup_template.yml").write_text(
        "merge_method: linear\nmodels:\n  - model: models/ft1\n  - model: models/ft2\n"
        "  - model: models/base\n"
    )
    search_file = problem / "soup.yml"
    search_file.write_text(
        "template: soup_template.yml\nobjective:\n  tasks: [{task: a.yml}, {task: b.yml}]\n"
        "optimiser: {name: greedy_soup}\n"
    )
    result = run_search(search_file, problem / "soup", SearchOptions(threads=1))
    # three models scored alone, then the two next-best each tried in the soup
    assert len(result.trials) == 5
    alone = [t.outcome.score for t in result.trials[:3] if t.outcome]
    assert result.best is not None and result.best.outcome is not None
    assert result.best.outcome.score >= max(alone)
    recipe = result.best.config
    assert recipe["merge_method"] == "linear"
    chosen = [Path(m["model"]).name for m in recipe["models"]]
    assert chosen[0] == ["ft1", "ft2", "base"][alone.index(max(alone))]
    # the soup's own score (an average of state dicts) equals its recipe merged
    again = alloykit.evaluate(problem / "soup" / "best.yml", [problem / "a.yml"])
    assert again["a"] == pytest.approx(result.best.outcome.tasks["a"], abs=1e-9)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["missing.yml", "OUT"], "search file 'missing.yml' does not exist"),
        (["SEARCH", "EXISTING"], "exists and is not empty; pass --resume"),
        (["SEARCH", "NEW", "--resume"], "holds no study"),
    ],
)
def test_bad_input_is_one_line(
    problem: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "file").write_text("x")
    names = {
        "SEARCH": str(write_search(problem, "tpe", 2)),
        "EXISTING": str(tmp_path / "existing"),
        "NEW": str(tmp_path / "new"),
        "OUT": str(tmp_path / "out"),
    }
    code, _, stderr = _cli(monkeypatch, capsys, "search", *[names.get(a, a) for a in arguments])
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "new").exists()


def test_missing_libraries_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(SearchError, match=r"pip install 'alloykit\[search\]'"):
        run_search(tmp_path / "s.yml", tmp_path / "out")
    code, _, stderr = _cli(monkeypatch, capsys, "search", "s.yml", tmp_path / "out")
    assert code == 1
    err = stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'alloykit[search]'" in err[0]


def test_help_has_examples() -> None:
    result = run_cli("search", "--help")
    assert result.returncode == 0
    for flag in ("--resume", "--budget", "--time-limit", "--seed", "--device", "Examples:"):
        assert flag in result.stdout


def test_the_documented_search_file_runs(problem: Path, tmp_path: Path) -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "search.md").read_text()
    search_yaml, template_yaml = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)[:2]
    (problem / "doc_template.yml").write_text(template_yaml)
    search_yaml = search_yaml.replace("template: template.yml", "template: doc_template.yml")
    (problem / "documented.yml").write_text(search_yaml)
    search = load_search(problem / "documented.yml")
    assert len(search.space.names) == 2 + 6 + 1 + 1 + 1
    result = run_search(
        problem / "documented.yml", tmp_path / "out", SearchOptions(threads=1, budget=3)
    )
    assert len(result.trials) == 3 and all(t.error is None for t in result.trials)
    methods = {t.config["merge_method"] for t in result.trials}
    assert methods <= {"ties", "dare_ties"}
