"""`alloykit evaluate`: one model, a recipe in memory, --compare with a chart, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.evaluation.fixtures import write_jsonl, write_task
from tests.helpers import run_cli

EXAMPLE_TASK = Path(__file__).resolve().parents[2] / "src/alloykit/examples/next_word.yml"


@pytest.fixture(scope="module")
def ppl_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli_tasks")
    write_jsonl(folder / "text.jsonl", [{"text": "w1 w2 w3 w4"}, {"text": "w7 w8"}])
    return write_task(
        folder / "ppl.yml", "data: text.jsonl\nprompt: '{{ text }}'\nmetric: perplexity\n"
    )


def test_evaluate_a_recipe_in_memory_prints_a_table_and_writes_json(
    tmp_path: Path, family: dict[str, Path], ppl_task: Path
) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0}}\n"
    )
    out = tmp_path / "scores.json"
    result = run_cli(
        "evaluate",
        recipe,
        "--task",
        EXAMPLE_TASK,
        "--task",
        ppl_task,
        "-o",
        out,
        "-q",
        "--batch-size",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "next_word" in result.stdout and "perplexity" in result.stdout
    data = json.loads(out.read_text())
    assert len(data["recipe_hash"]) == 64 and data["model"] == str(recipe)
    assert set(data["tasks"]) == {"next_word", "ppl"}
    assert data["tasks"]["next_word"]["n"] == 12
    assert not list(tmp_path.glob("*/config.json"))  # nothing was written


def test_compare_normalises_by_each_tasks_finetune_and_draws_a_chart(
    tmp_path: Path, family: dict[str, Path], ppl_task: Path
) -> None:
    out = tmp_path / "cmp.json"
    chart = tmp_path / "bars.png"
    result = run_cli(
        "evaluate",
        "--compare",
        family["base"],
        family["ft1"],
        "--task",
        EXAMPLE_TASK,
        "--task",
        ppl_task,
        "--finetune",
        f"ppl={family['ft2']}",
        "--finetune",
        f"next_word={family['ft1']}",
        "-o",
        out,
        "--plot",
        chart,
        "-q",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["models"] == [str(family["base"]), str(family["ft1"]), str(family["ft2"])]
    ppl = {
        m: r["tasks"]["ppl"]["scores"]["perplexity"]
        for m, r in zip(data["models"], data["results"], strict=True)
    }
    for model in data["models"]:
        # lower is better: the ratio is the fine-tune's perplexity over the model's
        assert data["normalised"][model]["ppl"] == pytest.approx(
            ppl[str(family["ft2"])] / ppl[model]
        )
    assert data["normalised"][str(family["ft1"])]["next_word"] == pytest.approx(1.0)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean normalised" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["MODEL"], "needs at least one --task"),
        (["MODEL", "MODEL", "--task", "TASK"], "pass --compare"),
        (["MODEL", "--task", "TASK", "--batch-size", "zero"], "--batch-size 'zero'"),
        (["MODEL", "--task", "TASK", "--plot", "x.png"], "--plot draws the --compare table"),
        (["MODEL", "--task", "TASK", "--finetune", "a=b"], "--finetune sets what --compare"),
        (["MODEL", "--task", "missing.yml"], "task file 'missing.yml' does not exist"),
        (["nowhere/model", "--task", "TASK"], "model 'nowhere/model'"),
        (["--compare", "MODEL", "--task", "TASK", "--finetune", "oops"], "--finetune 'oops'"),
    ],
)
def test_bad_input_is_one_line(
    family: dict[str, Path], ppl_task: Path, arguments: list[str], message: str
) -> None:
    names = {"MODEL": str(family["base"]), "TASK": str(ppl_task)}
    result = run_cli("evaluate", *[names.get(a, a) for a in arguments])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_help_has_examples() -> None:
    result = run_cli("evaluate", "--help")
    assert result.returncode == 0
    for flag in ("--task", "--compare", "--device", "--batch-size", "--plot", "Examples:"):
        assert flag in result.stdout
