"""``alloykit lora extract`` and ``alloykit lora merge`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.lora.conftest import run_alloykit


def _one_error_line(result: tuple[int, str, str]) -> str:
    code, _, stderr = result
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1, stderr
    return lines[0]


def test_extract_prints_and_saves_errors(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = ["lora", "extract", "--base", family["base"], "--model", family["ft1"]]
    result = run_cli(*args, "--rank", "3", "--modules", "q_proj,v_proj", out)
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.self_attn.q_proj" in result.stdout
    assert "relative error" in result.stdout
    report = json.loads((out / "alloykit_extract.json").read_text())
    assert {m["rank"] for m in report["modules"]} == {3}
    assert (out / "adapter_config.json").is_file()


def test_extract_bad_input_is_one_line(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["lora", "extract", "--base", family["base"], "--model", family["ft1"]]
    line = _one_error_line(run_alloykit(capsys, *args, "--rank", "0", tmp_path / "a"))
    assert "rank 0" in line
    line = _one_error_line(run_alloykit(capsys, *args, tmp_path / "a"))
    assert "--rank" in line
    line = _one_error_line(
        run_alloykit(
            capsys,
            "lora",
            "extract",
            "--base",
            tmp_path / "nope",
            "--model",
            family["ft1"],
            "--rank",
            "2",
            tmp_path / "a",
        )
    )
    assert "nope" in line
    assert not (tmp_path / "a").exists()


def test_merge_cli(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.lora.conftest import make_adapter

    first = make_adapter(family["base"], tmp_path / "first", seed=1)
    second = make_adapter(family["base"], tmp_path / "second", seed=2, r=2)
    recipe = tmp_path / "adapters.yml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nmodels:\n  - model: {first}\n  - model: {second}\n"
        "parameters: {weight: 1.0}\nrank: 3\n"
    )
    code, stdout, stderr = run_alloykit(capsys, "lora", "merge", recipe, tmp_path / "merged")
    assert code == 0, stderr
    assert "re-factorisation error" in stdout
    assert (tmp_path / "merged" / "alloykit_lora_merge.json").is_file()
    # bad input: one line, non-zero exit, no output folder
    recipe.write_text(f"merge_method: cat\nmodels:\n  - model: {first}\nrank: 3\n")
    line = _one_error_line(run_alloykit(capsys, "lora", "merge", recipe, tmp_path / "again"))
    assert "cat is exact" in line
    recipe.write_text(f"merge_method: cat\nmodels:\n  - model: {tmp_path / 'missing'}\n")
    line = _one_error_line(run_alloykit(capsys, "lora", "merge", recipe, tmp_path / "again"))
    assert "missing" in line
    assert not (tmp_path / "again").exists()
