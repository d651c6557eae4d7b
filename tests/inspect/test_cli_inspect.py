"""`alloykit inspect` from the command line: summary, JSON, HTML, and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from alloykit.cli import main
from alloykit.inspect.collect import inspect_models
from alloykit.inspect.summary import summarize
from tests.helpers import run_cli, write_yaml


def test_models_summary_and_json(constructed: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    models = [constructed[n] for n in ("ft", "same", "negated", "foreign")]
    done = run_cli("inspect", "--base", constructed["base"], *models, "--json", out)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "ft and same: cosine 1.00, 0% of top-20% signs disagree" in text
    assert "ft and negated: cosine -1.00, 100% of top-20% signs disagree throughout" in text
    assert "foreign does not share the base" in text
    assert "ft shares the base: task vector 0.100" in text
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["models"]] == ["ft", "same", "negated", "foreign"]
    assert [m["shares_base"] for m in data["models"]] == [True, True, True, False]
    assert data["total"]["cosine"]["ft|negated"] == pytest.approx(-1)
    assert data["total"]["sign_conflict"]["ft|same"] == 0
    assert [layer["layer"] for layer in data["layers"]] == [0, 1, 2]
    mlp = data["layers"][1]["kinds"]["mlp"]
    assert mlp["relative_norm"]["ft"] == pytest.approx(0.1, rel=1e-6)
    assert set(mlp["top_share"]["ft"]) == {"1%", "5%", "20%"}
    assert "embedding" in data["outside_layers"]
    assert "retained" not in data["total"]  # only with a recipe


def test_summary_locates_conflicting_layers(constructed: dict[str, Path]) -> None:
    inspection = inspect_models(
        str(constructed["base"]), [str(constructed["ft"]), str(constructed["partly"])]
    )
    lines = summarize(inspection)
    assert "  ft and partly conflict in layers 1-2 MLP: 100% of top-20% signs disagree" in lines
    assert not any("attention" in line and "conflict in" in line for line in lines)
    conflict = inspection.layer(0, "mlp").conflict()[0, 1]
    assert conflict == 0


def test_config_mode_json_has_retained_and_interference(
    constructed: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_yaml(
        tmp_path / "ties.yml",
        f"""merge_method: ties
base_model: {constructed["base"]}
models:
  - model: {constructed["ft"]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {constructed["same"]}
    parameters: {{weight: 1.0, density: 0.5}}
""",
    )
    out = tmp_path / "s.json"
    done = run_cli("inspect", recipe, "--json", out)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["method"] == "ties"
    # identical task vectors: the same top half is kept and elected, so TIES keeps the top half
    # of each and the merge differs from task arithmetic by exactly the trimmed half
    retained = data["total"]["retained"]
    assert retained["ft"] == pytest.approx(retained["same"])
    assert 0.5 < retained["ft"] < 1
    assert data["total"]["interference"] == pytest.approx((1 - retained["ft"]) ** 0.5, rel=1e-6)
    assert "ties keeps" in done.stdout and "interference" in done.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((), "give one recipe"),
        (("--base", "{base}"), "give at least one model besides --base"),
        (("a.yml", "b.yml"), "give one recipe"),
        (("{base}",), "is a folder, not a recipe"),
        (("--base", "{base}", "{missing}"), "no such folder"),
        (("--base", "{base}", "{ft}", "--html", "{nofolder}/r.html"), "cannot write"),
        (("{nobase}",), "has no base_model"),
        (("--base", "{base}", "{ft}", "--precision", "half"), "use float32 or float64"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    constructed: dict[str, Path],
    tmp_path: Path,
    arguments: tuple[str, ...],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nobase = write_yaml(
        tmp_path / "nobase.yml",
        f"merge_method: linear\nmodels:\n  - model: {constructed['ft']}\n"
        f"    parameters: {{weight: 1.0}}\n  - model: {constructed['same']}\n"
        "    parameters: {weight: 1.0}\n",
    )
    values = {
        "base": constructed["base"],
        "ft": constructed["ft"],
        "missing": tmp_path / "missing",
        "nofolder": tmp_path / "nofolder",
        "nobase": nobase,
    }
    # in process (the subprocess tests above cover the real entry point): main()'s error boundary
    monkeypatch.setattr(
        sys, "argv", ["alloykit", "inspect", *(a.format(**values) for a in arguments)]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code not in (0, None)
    stderr = capsys.readouterr().err
    assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "nofolder").exists()


def test_help_shows_examples() -> None:
    done = run_cli("inspect", "--help")
    assert done.returncode == 0
    assert "alloykit inspect --base ./base ./ft-math ./ft-code" in done.stdout
    assert "--json" in done.stdout and "--html" in done.stdout
