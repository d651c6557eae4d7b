"""Config parsing, validation (every problem at once, with YAML paths) and parameter resolution."""

from __future__ import annotations

import logging
import re

import pytest

from alloykit.config import (
    ModelRef,
    evaluate_setting,
    load_config,
    parse_model_string,
    recipe_hash,
    resolve_parameter,
    yaml_path,
)
from alloykit.errors import ConfigError
from alloykit.methods import METHODS

LINEAR = {
    "merge_method": "linear",
    "models": [
        {"model": "a", "parameters": {"weight": 1.0}},
        {"model": "b", "parameters": {"weight": 0.5}},
    ],
}
NAME = "model.layers.3.mlp.up_proj.weight"


# --------------------------------------------------------------------------- values


def test_scalar_is_itself() -> None:
    assert evaluate_setting(0.3, NAME, 0.7) == 0.3
    assert evaluate_setting(True, NAME, 0.7) is True


@pytest.mark.parametrize(
    ("gradient", "t", "expected"),
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([1.0, 0.7, 0.1], 0.5, 0.7),
        ([1.0, 0.7, 0.1], 0.75, 0.4),  # s = 1.5: halfway between 0.7 and 0.1
        ([0, 0.5, 0.3, 0.7, 1], 10 / 39, 0.5 + (40 / 39 - 1) * (0.3 - 0.5)),  # reference §2.3
        ([5.0], 0.6, 5.0),
    ],
)
def test_gradient_interpolates_piecewise_linearly(
    gradient: list[float], t: float, expected: float
) -> None:
    assert evaluate_setting(gradient, NAME, t) == pytest.approx(expected, abs=1e-12)


def test_list_of_strings_picks_without_interpolation() -> None:
    assert evaluate_setting(["a", "b", "c"], NAME, 0.9) == "b"  # int(0.9 * 2) = 1


def test_filters_first_match_wins_and_star_and_null_match_all() -> None:
    setting = [
        {"filter": "self_attn", "value": 1.0},
        {"filter": "mlp", "value": 2.0},
        {"value": 3.0},
    ]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 1.0
    assert evaluate_setting(setting, NAME, 0) == 2.0
    assert evaluate_setting(setting, "model.norm.weight", 0) == 3.0
    assert evaluate_setting([{"filter": "*", "value": 4.0}], NAME, 0) == 4.0


def test_filter_value_can_be_a_gradient() -> None:
    setting = [{"filter": "mlp", "value": [0.0, 1.0]}]
    assert evaluate_setting(setting, NAME, 0.5) == 0.5


def test_no_matching_filter_gives_none() -> None:
    assert evaluate_setting([{"filter": "self_attn", "value": 1.0}], NAME, 0) is None


# --------------------------------------------------------------------------- precedence


def test_source_parameters_win_over_slice_and_top_level() -> None:
    levels = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}]
    value = resolve_parameter(
        "weight", per_model=True, levels=levels, input_name=NAME, output_name=NAME, t=0
    )
    assert value == 1.0


def test_unmatched_filter_falls_through_to_the_next_level() -> None:
    levels = [{"weight": [{"filter": "self_attn", "value": 1.0}]}, None, {"weight": 0.3}]
    value = resolve_parameter(
        "weight", per_model=True, levels=levels, input_name=NAME, output_name=NAME, t=0
    )
    assert value == 0.3


def test_global_parameters_skip_the_per_model_level_and_use_the_output_name() -> None:
    levels = [{"t": 0.9}, None, {"t": [{"filter": "layers.5.", "value": 0.1}, {"value": 0.7}]}]
    value = resolve_parameter(
        "t",
        per_model=False,
        levels=levels,
        input_name="model.layers.2.mlp.w",
        output_name="model.layers.5.mlp.w",
        t=0,
    )
    assert value == 0.1  # matched against the output name; the per-model 0.9 is ignored


def test_per_model_parameters_match_the_input_tensor_name() -> None:
    levels = [{"weight": [{"filter": "layers.2.", "value": 0.4}, {"value": 1.0}]}, None, None]
    value = resolve_parameter(
        "weight",
        per_model=True,
        levels=levels,
        input_name="model.layers.2.mlp.w",
        output_name="model.layers.5.mlp.w",
        t=0,
    )
    assert value == 0.4


def test_nothing_anywhere_gives_none() -> None:
    value = resolve_parameter(
        "weight", per_model=True, levels=[None, None, {}], input_name=NAME, output_name=NAME, t=0
    )
    assert value is None


# --------------------------------------------------------------------------- schema


def test_model_reference_syntax() -> None:
    assert parse_model_string("org/model@v1") == {"path": "org/model", "revision": "v1"}
    assert parse_model_string("a+lora@r2")["lora_revision"] == "r2"
    with pytest.raises(ValueError, match="more than one"):
        parse_model_string("a+b+c")
    ref = ModelRef.model_validate({"model": {"path": "org/m", "revision": "main"}})
    assert str(ref) == "org/m@main"


def test_every_problem_is_reported_at_once_with_its_yaml_path() -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": "heavy"}},
            {"model": "b", "parameters": {"weight": [1.0, float("nan")], "normalize": [True]}},
        ],
        "parameters": {"lambda": [{"filter": "mlp", "value": "x"}]},
        "dtype": "float8",
    }
    with pytest.raises(ConfigError) as info:
        load_config(config)
    problems = info.value.problems
    assert "models[0].parameters.weight: 'heavy' is not a number" in problems
    assert "models[1].parameters.weight[1]: nan is not finite" in problems
    assert "models[1].parameters.normalize: normalize takes true or false, not a list" in problems
    assert "parameters.lambda[0].value: 'x' is not a number" in problems
    assert any(p.startswith("dtype: unknown dtype 'float8'") for p in problems)


def test_range_error_message_matches_the_documented_form() -> None:
    from alloykit.methods.registry import Param

    density = Param("density", default=1.0, per_model=True, low=0.0, high=1.0)
    assert density.check(1.4) == "1.4 is outside [0, 1]"


def test_unknown_keys_get_a_did_you_mean() -> None:
    with pytest.raises(
        ConfigError, match=r"merge_mehtod: unknown key \(did you mean 'merge_method'"
    ):
        load_config({"merge_mehtod": "linear", "models": []})
    with pytest.raises(ConfigError, match=r"models\[0\].paramters: unknown key"):
        load_config({"merge_method": "linear", "models": [{"model": "a", "paramters": {}}]})


def test_unknown_method_lists_known_ones() -> None:
    known = ", ".join(sorted(METHODS))  # every registered method, in alphabetical order
    with pytest.raises(
        ConfigError,
        match=r"unknown method 'lineer' \(did you mean 'linear'\?\); known: "
        + re.escape(known)
        + "$",
    ):
        load_config({**LINEAR, "merge_method": "lineer"})


def test_models_or_slices_exactly_one() -> None:
    with pytest.raises(ConfigError, match="exactly one of 'models', 'slices' or 'modules'$"):
        load_config({"merge_method": "linear"})


def test_task_arithmetic_needs_a_base() -> None:
    with pytest.raises(ConfigError, match="base_model: task_arithmetic needs a base_model"):
        load_config({**LINEAR, "merge_method": "task_arithmetic"})


def test_unused_parameter_warns_and_strict_makes_it_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = {**LINEAR, "parameters": {"densty": 0.5}}
    with caplog.at_level(logging.WARNING, logger="alloykit"):
        load_config(config)
    assert "parameters.densty: 'densty' is not a parameter of linear" in caplog.text
    assert "its parameters are weight, normalize" in caplog.text
    with pytest.raises(ConfigError, match="densty.*--strict"):
        load_config(config, strict=True)


def test_global_parameter_given_per_model_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    config = {**LINEAR, "models": [{"model": "a", "parameters": {"weight": 1, "normalize": False}}]}
    with caplog.at_level(logging.WARNING, logger="alloykit"):
        load_config(config)
    assert "models[0].parameters.normalize: 'normalize' is a global parameter" in caplog.text


def test_tokenizer_and_chat_template_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            {
                **LINEAR,
                "tokenizer_source": "union",
                "tokenizer": {"source": "base"},
                "chat_template": "short",
            }
        )
    text = str(info.value)
    assert "give either tokenizer_source or tokenizer" in text
    assert "chat_template: 'short' is neither" in text


def test_slices_layer_ranges_are_checked() -> None:
    config = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": "a", "layer_range": [0, 4], "parameters": {"weight": 1}},
                    {"model": "b", "layer_range": [2, 3], "parameters": {"weight": 1}},
                ]
            }
        ],
    }
    with pytest.raises(
        ConfigError,
        match=r"slices\[0\].sources: layer ranges of one slice must have the same length",
    ):
        load_config(config)


def test_yaml_path_formatting() -> None:
    assert yaml_path("models", 1, "parameters", "density") == "models[1].parameters.density"


def test_yaml_round_trip_and_recipe_hash_is_stable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text_a = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n  - model: b@v2\n    parameters:\n      weight: [0, 1]\n"
    text_b = "# same recipe, other layout\nmodels: [{parameters: {weight: 1.0}, model: a}, {model: b@v2, parameters: {weight: [0, 1]}}]\nmerge_method: linear\n"
    config_a, config_b = load_config(text_a), load_config(text_b)
    assert recipe_hash(config_a) == recipe_hash(config_b)
    again = load_config(config_a.to_yaml())
    assert again == config_a
    assert recipe_hash(again) == recipe_hash(config_a)
    changed = load_config(text_a.replace("weight: 1.0", "weight: 1.5"))
    assert recipe_hash(changed) != recipe_hash(config_a)


def test_config_file_errors_name_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError, match="nope.yml' does not exist"):
        load_config(missing)
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [linear\n")
    with pytest.raises(ConfigError, match="bad.yml' is not valid YAML"):
        load_config(bad)
