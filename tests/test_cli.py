"""The alloykit command: help text, fast start-up, dry run, methods and the bundled example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import run_cli


def test_help_does_not_import_torch() -> None:
    """`alloykit --help` must start fast: torch and transformers are imported by commands only."""
    code = (
        "import sys\n"
        "sys.argv = ['alloykit', '--help']\n"
        "from alloykit.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "merge" in result.stdout and "example" in result.stdout


def test_every_command_has_help() -> None:
    for command in ("merge", "methods", "example"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        assert "Usage: alloykit " + command in result.stdout
    merge_help = run_cli("merge", "--help").stdout
    for flag in (
        "--device",
        "--cuda",
        "--seed",
        "--random-seed",
        "--threads",
        "--out-shard-size",
        "--copy-tokenizer",
        "--no-copy-tokenizer",
        "--dry-run",
        "--overwrite",
        "--strict",
        "--allow-crimes",
        "--trust-remote-code",
        "--quiet",
        "Examples:",
    ):
        assert flag in merge_help, flag


def test_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    config = tmp_path / "ta.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['ft1']}\n    parameters: {{weight: [0.0, 1.0]}}\n"
        "parameters: {lambda: 0.5}\n"
    )
    result = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out").exists()
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.startswith("model.layers.3.mlp.up_proj.weight"))
    assert "task_arithmetic" in row and "weight=[1]" in row and "lambda=0.5" in row
    assert "total: 39 tensors, 4 layers, 2 models" in result.stdout


def test_methods_lists_and_describes() -> None:
    from alloykit.methods import METHODS

    listing = run_cli("methods").stdout
    assert [line.split()[0] for line in listing.splitlines()] == list(METHODS)
    detail = run_cli("methods", "task_arithmetic").stdout
    assert "lambda" in detail and "arXiv:2212.04089" in detail
    assert "properties: idempotent, constant, symmetric" in detail
    nuslerp = run_cli("methods", "nuslerp").stdout
    assert "at least 2, at most 2" in nuslerp and "base_model: optional" in nuslerp
    wrong = run_cli("methods", "tie")
    assert wrong.returncode == 1 and "unknown method 'tie'" in wrong.stderr


def test_example_command_builds_merges_and_loads(tmp_path: Path) -> None:
    result = run_cli("example", tmp_path / "ex", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "merged 39 tensors of 3 models with task_arithmetic" in result.stdout
    assert "no missing, unexpected or mismatched keys" in result.stdout
    assert (tmp_path / "ex" / "merged" / "alloykit_config.yml").is_file()
    again = run_cli(
        "merge", tmp_path / "ex" / "merged" / "alloykit_config.yml", tmp_path / "again", "-q"
    )
    assert again.returncode == 0, again.stderr
    first = (tmp_path / "ex" / "merged" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first
