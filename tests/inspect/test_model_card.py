"""The README.md model card every merge writes (and --no-model-card skips)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from alloykit import MergeOptions, __version__, merge
from tests.helpers import run_cli, write_yaml


def front_matter(card: str) -> dict[str, object]:
    match = re.match(r"^---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match is not None, card[:200]
    data = yaml.safe_load(match[1])
    assert isinstance(data, dict)
    return data


def test_card_has_front_matter_inputs_recipe_citation_and_version(
    constructed: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "ties",
        "base_model": str(constructed["base"]),
        "models": [
            {"model": str(constructed[m]), "parameters": {"weight": 1.0, "density": 0.5}}
            for m in ("ft", "same")
        ],
    }
    result = merge(config, tmp_path / "merged", MergeOptions(hash_inputs=True))
    assert "README.md" in result.files
    card = (result.output / "README.md").read_text()
    front = front_matter(card)
    assert front == {
        "base_model": str(constructed["base"]),
        "tags": ["merge", "alloykit"],
        "library_name": "transformers",
    }
    assert f"alloykit {__version__}" in card
    assert "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708" in card
    rows = re.findall(
        r"^\| `([^`]+)` \| (\w+) \| `([^`]+)` \| model.safetensors \| `([0-9a-f]{64})` \|$",
        card,
        re.M,
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (str(constructed["base"]), "base", "local"),
        (str(constructed["ft"]), "input", "local"),
        (str(constructed["same"]), "input", "local"),
    ]
    for (_, _, _, sha), model in zip(rows, ("base", "ft", "same"), strict=True):
        data = (constructed[model] / "model.safetensors").read_bytes()
        assert sha == hashlib.sha256(data).hexdigest()
    recipe = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe)["merge_method"] == "ties"
    assert result.recipe_hash[:16] in card


def test_fingerprint_is_stable_and_no_card_when_asked(
    constructed: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(constructed["base"]),
        "models": [{"model": str(constructed["ft"]), "parameters": {"weight": 1.0}}],
    }
    first = (merge(config, tmp_path / "a").output / "README.md").read_text()
    second = (merge(config, tmp_path / "b").output / "README.md").read_text()
    assert first.replace("# a\n", "# b\n") == second
    skipped = merge(config, tmp_path / "c", MergeOptions(model_card=False))
    # local inputs are not read a second time unless asked (Hub inputs' hashes are free)
    assert "not hashed (local file; merge with --hash-inputs)" in first
    assert "README.md" not in skipped.files


def test_cli_no_model_card(constructed: dict[str, Path], tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "r.yml",
        f"merge_method: task_arithmetic\nbase_model: {constructed['base']}\n"
        f"models:\n  - model: {constructed['ft']}\n    parameters: {{weight: 1.0}}\n",
    )
    done = run_cli("merge", config, tmp_path / "out", "--no-model-card", "-q")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "out" / "README.md").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()
