"""``alloykit moe``: a build from YAML, help with examples, one-line errors and no partial output."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helpers import run_cli
from tests.moe.conftest import expert_config


def test_moe_command_builds_and_its_recipe_rebuilds_the_same_model(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = expert_config(family["base"], [family["ft1"], family["ft2"]], gate_mode="random")
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    result = run_cli("moe", tmp_path / "moe.yml", tmp_path / "out", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "mixtral, 2 experts, 2 per token" in result.stdout
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "alloykit_moe_config.yml",
    } <= files
    from alloykit.moe import MoEOptions, build_moe

    build_moe(tmp_path / "out" / "alloykit_moe_config.yml", tmp_path / "again", MoEOptions(seed=0))
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first


def test_moe_errors_are_one_line_and_leave_no_output(
    family: dict[str, Path], qwen2_family: dict[str, Path], tmp_path: Path
) -> None:
    config = expert_config(family["base"], [family["ft1"], qwen2_family["ft1"]], gate_mode="random")
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(config))
    for name, expected in (
        ("bad.yml", "every expert must share the base's architecture"),
        ("missing.yml", "does not exist"),
    ):
        result = run_cli("moe", tmp_path / name, tmp_path / "out")
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out*"))


def test_moe_help_shows_options_and_an_example() -> None:
    result = run_cli("moe", "--help")
    assert result.returncode == 0
    for text in ("Usage: alloykit moe", "--seed", "--device", "--dry-run", "positive_prompts"):
        assert text in result.stdout
