"""docs/moe.md documents every config key, gate mode and architecture; the README example runs."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

from alloykit.moe import Expert, MoEConfig, build_moe
from alloykit.moe.config import GateMode
from alloykit.moe.layout import ARCHITECTURES
from tests.moe.conftest import load_model

ROOT = Path(__file__).resolve().parents[2]


def test_docs_cover_every_key_mode_and_architecture() -> None:
    text = (ROOT / "docs" / "moe.md").read_text()
    for key in MoEConfig.model_fields:
        assert f"| `{key}` |" in text, f"docs/moe.md: config key {key} undocumented"
    for key in Expert.model_fields:
        assert f"| `experts[i].{key}` |" in text, f"docs/moe.md: expert key {key} undocumented"
    for mode in get_args(GateMode):
        assert f"| `{mode}` |" in text, f"docs/moe.md: gate mode {mode} undocumented"
    for arch in ARCHITECTURES.values():
        assert f"| `{arch.name}` (`{arch.class_name}`) |" in text, arch.name
    assert "arXiv:2403.13257" in text and "arXiv:2401.04088" in text


def test_readme_example_builds_a_model(family: dict[str, Path], tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Mixture of experts\n", 1)[1].split("\n## ", 1)[0]
    recipe = re.search(r"<<'EOF'\n(.*?)\nEOF", section, flags=re.DOTALL)
    assert recipe is not None
    config = yaml.safe_load(recipe[1].replace("demo/models/", f"{family['base'].parent}/"))
    result = build_moe(config, tmp_path / "moe")
    assert result.architecture == "mixtral" and result.experts == 2
    load_model(tmp_path / "moe")


def test_docs_examples_are_valid_configs() -> None:
    from alloykit.moe import load_moe_config

    text = (ROOT / "docs" / "moe.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        load_moe_config(yaml.safe_load(block))


@pytest.mark.parametrize(
    "name",
    [
        "alloykit.moe",
        "alloykit.moe.config",
        "alloykit.moe.gates",
        "alloykit.moe.plan",
        "alloykit.moe.build",
    ],
)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
