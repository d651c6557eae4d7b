"""``alloykit merge --ray`` and ``alloykit search --ray`` from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.test_ray_merge import _files, _recipe
from tests.helpers import run_cli


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str | Path
) -> tuple[int, str, str]:
    """Run ``alloykit ARGS`` in this process (uses the session's Ray instance)."""
    from alloykit import cli

    monkeypatch.setattr(sys, "argv", ["alloykit", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    captured = capsys.readouterr()
    return int(exit.value.code or 0), captured.out, captured.err


def test_merge_with_ray_writes_the_same_model(
    ray_instance: Any,
    family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _recipe(tmp_path, family)
    common = ["--seed", "5", "--out-shard-size", "30KB", "-q"]
    code, _, err = _cli(monkeypatch, capsys, "merge", recipe, tmp_path / "a" / "m", *common)
    assert code == 0, err
    code, _, err = _cli(
        monkeypatch, capsys, "merge", recipe, tmp_path / "b" / "m", *common, "--ray", "local"
    )
    assert code == 0, err
    assert _files(tmp_path / "b" / "m") == _files(tmp_path / "a" / "m")


def test_a_plan_that_cannot_be_split_is_one_line_and_no_output(
    ray_instance: Any,
    family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _recipe(tmp_path, family)
    recipe.write_text(recipe.read_text() + "parameters: {density_scope: model}\n")
    out = tmp_path / "out"
    code, _, err = _cli(monkeypatch, capsys, "merge", recipe, out, "--ray", "local", "-q")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "density_scope: model" in lines[0] and "--ray" in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "alloykit" in p.name]


def test_without_ray_installed_the_error_names_the_extra(
    family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    recipe = _recipe(tmp_path, family)
    code, _, err = _cli(monkeypatch, capsys, "merge", recipe, tmp_path / "o", "--ray", "local")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'alloykit[distributed]'" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_help_shows_the_ray_examples() -> None:
    result = run_cli("merge", "--help")
    assert result.returncode == 0
    assert "--ray" in result.stdout and "--ray-workers" in result.stdout


def test_search_with_ray_runs_and_bad_input_is_one_line(
    ray_instance: Any,
    problem: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.search.problem import write_search

    search_file = write_search(problem, "random", 2, name="cli_ray.yml")
    out = tmp_path / "search"
    code, stdout, err = _cli(
        monkeypatch,
        capsys,
        "search",
        search_file,
        out,
        "--ray",
        "local",
        "--ray-workers",
        "1",
        "--save-model",
    )
    assert code == 0, err
    assert "trial 2/2" in stdout and "best: trial" in stdout
    assert len((out / "trials.csv").read_text().splitlines()) == 3  # header and two trials
    # the best recipe, merged by Ray tasks, equals its one-process merge
    from alloykit.pipeline import MergeOptions, merge
    from alloykit.search.study import trial_seed

    summary = json.loads((out / "summary.json").read_text())
    seed = trial_seed(0, summary["best"]["slot"])
    again = merge(out / "best.yml", tmp_path / "again" / "model", MergeOptions(seed=seed))
    ray_model = {p.name: p.read_bytes() for p in (out / "model").glob("*.safetensors")}
    assert ray_model == {p.name: p.read_bytes() for p in again.output.glob("*.safetensors")}

    capsys.readouterr()  # the warnings of the merge above
    soup = write_search(problem, "greedy_soup", 3, name="cli_ray_soup.yml")
    code, _, err = _cli(monkeypatch, capsys, "search", soup, tmp_path / "soup", "--ray", "local")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "greedy_soup" in lines[0] and "--ray" in lines[0], err
    assert not (tmp_path / "soup").exists()
