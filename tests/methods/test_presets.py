"""Task-vector presets end to end: step compositions, seeds, thread counts, no sorting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alloykit import MergeOptions, load_config, merge_to_state_dict
from alloykit.errors import ConfigError


def recipe(family: dict[str, Path], method: object, **parameters: object) -> dict[str, object]:
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.4}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.6, "density": 0.7}},
            {"model": str(family["ft3"]), "parameters": {"weight": -0.3, "density": 0.5}},
        ],
        "parameters": parameters,
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_composition_of_the_ties_steps_is_ties(family: dict[str, Path]) -> None:
    steps = {"sparsify": "magnitude", "elect": "mass", "combine": "sum"}
    assert_same(
        merge_to_state_dict(recipe(family, "ties")), merge_to_state_dict(recipe(family, steps))
    )


def test_preset_options_equal_the_matching_composition(family: dict[str, Path]) -> None:
    preset = merge_to_state_dict(recipe(family, "ties", elect="count", combine="mean"))
    steps = {"sparsify": "magnitude", "elect": "count", "combine": "mean"}
    composed = merge_to_state_dict(recipe(family, steps))
    assert_same(preset, composed)
    plain = merge_to_state_dict(recipe(family, "ties"))
    assert any(not torch.equal(preset[n], plain[n]) for n in plain)  # the options matter


def test_composition_errors_name_the_step() -> None:
    config = {
        "merge_method": {"sparsify": "trim", "elect": "majority", "combin": "sum"},
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 1}}],
    }
    with pytest.raises(ConfigError) as info:
        load_config(config)
    text = str(info.value)
    assert (
        "merge_method.sparsify: 'trim' is not one of none, magnitude, random, breadcrumbs, della"
        in text
    )
    assert "merge_method.elect: 'majority' is not one of none, mass, count" in text
    assert "merge_method.combin: unknown step (did you mean 'combine'?)" in text


def test_composition_parameters_are_validated_like_a_presets() -> None:
    config = {
        "merge_method": {"sparsify": "breadcrumbs"},
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 1, "gamma": 1.5, "density": -0.1}}],
    }
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "models[0].parameters.gamma: 1.5 is outside [0, 1]" in info.value.problems
    assert "models[0].parameters.density: -0.1 is outside [0, 1]" in info.value.problems


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_a_seed_gives_the_same_output_on_any_thread_count(
    family: dict[str, Path], method: str
) -> None:
    config = recipe(family, method)
    one = merge_to_state_dict(config, MergeOptions(seed=7, threads=1))
    two = merge_to_state_dict(config, MergeOptions(seed=7, threads=2))
    assert_same(one, two)
    other = merge_to_state_dict(config, MergeOptions(seed=8))
    assert any(not torch.equal(one[n], other[n]) for n in one)


def test_rescale_modes_differ_and_inverse_is_the_papers(family: dict[str, Path]) -> None:
    l1 = merge_to_state_dict(recipe(family, "dare_linear"), MergeOptions(seed=3))
    inverse = merge_to_state_dict(
        recipe(family, "dare_linear", rescale_mode="inverse"), MergeOptions(seed=3)
    )
    assert any(not torch.equal(l1[n], inverse[n]) for n in l1)


def test_presets_run_with_sorting_forbidden(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a sort was called")

    for owner in (torch, torch.Tensor):
        monkeypatch.setattr(owner, "sort", forbidden)
        monkeypatch.setattr(owner, "argsort", forbidden)
    methods = ("ties", "breadcrumbs", "breadcrumbs_ties", "magnitude_prune", "dare_ties", "della")
    for method in (*methods, {"sparsify": "della", "elect": "count"}):
        merge_to_state_dict(recipe(family, method), MergeOptions(seed=0))
