"""The warnings `alloykit merge` gives by default, on constructed models with known answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alloykit import MergeOptions, merge, plan_merge
from alloykit.inspect.merge_checks import coefficient_warnings


def recipe(constructed: dict[str, Path], models: list[str], **parameters: Any) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(constructed["base"]),
        "models": [{"model": str(constructed[m]), "parameters": {"weight": 1.0}} for m in models],
        "parameters": parameters,
    }


def test_coefficients_far_from_one_warn_only_without_normalize(
    constructed: dict[str, Path],
) -> None:
    three = recipe(constructed, ["ft", "same", "small"])
    (message,) = coefficient_warnings(plan_merge(three))
    assert "Σ weight·lambda is 3" in message and "normalize" in message
    assert coefficient_warnings(plan_merge({**three, "parameters": {"lambda": 0.5}})) == []
    assert coefficient_warnings(plan_merge({**three, "parameters": {"normalize": True}})) == []
    ties = {**three, "merge_method": "ties"}  # normalizes by default
    assert coefficient_warnings(plan_merge(ties)) == []
    tiny = recipe(constructed, ["ft"], **{"lambda": 0.1})
    (message,) = coefficient_warnings(plan_merge(tiny))
    assert "is 0.1 " in message


def test_a_clean_merge_gives_no_warning(constructed: dict[str, Path], tmp_path: Path) -> None:
    result = merge(recipe(constructed, ["ft", "same"]), tmp_path / "out")
    assert result.warnings == []


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("zero", "is identical to the base in every merged tensor"),
        ("foreign", "does not look fine-tuned from the base"),
        ("small", "task-vector norms differ by 20x"),
    ],
)
def test_merge_warns_about_suspicious_task_vectors(
    constructed: dict[str, Path], tmp_path: Path, model: str, expected: str
) -> None:
    result = merge(recipe(constructed, ["ft", model]), tmp_path / "out")
    assert len(result.warnings) == 1, result.warnings
    assert expected in result.warnings[0] and f"{constructed[model]}'" in result.warnings[0]
    card = (tmp_path / "out" / "README.md").read_text()
    assert expected in card  # the card lists the merge's warnings


def test_norm_warning_is_silent_with_delta_norm_and_checks_can_be_off(
    constructed: dict[str, Path], tmp_path: Path
) -> None:
    normed = recipe(constructed, ["ft", "small"], delta_norm="l2")
    assert merge(normed, tmp_path / "a").warnings == []
    off = MergeOptions(checks=False)
    assert merge(recipe(constructed, ["ft", "foreign"]), tmp_path / "b", off).warnings == []
