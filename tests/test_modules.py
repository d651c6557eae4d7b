"""The ``modules:`` key: multi-module models (encoder-decoder, vision-language) merged per module.

A tiny random BART (``model.encoder.layers.N`` and ``model.decoder.layers.N``) is the
multi-module model: ``slices:`` over it is refused, ``modules:`` merges each stack with its own
models, slices and parameters, and tensors under no module come from the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from alloykit import merge, merge_to_state_dict, plan_merge
from alloykit.architecture import layer_stacks
from alloykit.config import load_config
from alloykit.errors import ConfigError
from alloykit.plan import stack_module_names
from tests.helpers import load_tensors, run_cli, write_yaml

ENCODER, DECODER = "model.encoder", "model.decoder"


def _bart_config():  # type: ignore[no-untyped-def]
    from transformers import BartConfig

    return BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )


@pytest.fixture(scope="module")
def bart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three random tiny BARTs (base, a, b) saved with save_pretrained."""
    from transformers import BartForConditionalGeneration

    root = tmp_path_factory.mktemp("bart")
    folders = {}
    for seed, name in enumerate(("base", "a", "b")):
        torch.manual_seed(seed)
        BartForConditionalGeneration(_bart_config()).save_pretrained(root / name)
        folders[name] = root / name
    return folders


def _linear(bart: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "linear", "base_model": str(bart["base"]), "dtype": "float32", **extra}


def _models(bart: dict[str, Path], wa: float, wb: float) -> list[dict[str, Any]]:
    return [
        {"model": str(bart["base"]), "parameters": {"weight": 0.0}},
        {"model": str(bart["a"]), "parameters": {"weight": wa}},
        {"model": str(bart["b"]), "parameters": {"weight": wb}},
    ]


# --------------------------------------------------------------------------- schema


def test_modules_is_the_third_alternative() -> None:
    module = {"models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    config = load_config({"merge_method": "linear", "modules": {"text": module}})
    assert config.modules is not None and list(config.modules) == ["text"]
    with pytest.raises(
        ConfigError,
        match=r"^config: give exactly one of 'models', 'slices' or 'modules' "
        r"\(got models, modules\)$",
    ):
        load_config(
            {"merge_method": "linear", "models": module["models"], "modules": {"t": module}}
        )


def test_a_module_needs_models_or_slices() -> None:
    with pytest.raises(
        ConfigError, match=r"^modules\.text: give exactly one of 'models' or 'slices'$"
    ):
        load_config({"merge_method": "linear", "modules": {"text": {"parameters": {"weight": 1}}}})


def test_unknown_module_key_suggests_the_right_one() -> None:
    data = {"merge_method": "linear", "modules": {"text": {"model": [{"model": "a"}]}}}
    with pytest.raises(
        ConfigError, match=r"modules\.text\.model: unknown key \(did you mean 'models'\?\)"
    ):
        load_config(data)


def test_module_parameters_are_checked_with_their_path() -> None:
    data = {
        "merge_method": "ties",
        "base_model": "base",
        "modules": {
            "text": {
                "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}],
                "parameters": {"density": 1.4},
            }
        },
    }
    with pytest.raises(ConfigError, match=r"modules\.text\.parameters\.density: 1\.4 is outside"):
        load_config(data)


def test_global_parameter_set_per_model_in_a_module_is_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    models = [{"model": "a", "parameters": {"t": 0.5}}, {"model": "b"}]
    data = {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3}}
    load_config({**data, "modules": {"models": {"models": models, "parameters": {"t": 0.2}}}})
    warned = [r.getMessage() for r in caplog.records]
    assert any(
        w.startswith("modules.models.models[0].parameters.t: 't' is a global") for w in warned
    )
    assert not any(w.startswith("modules.models.parameters.t") for w in warned)


def test_module_models_listed_twice_is_an_error() -> None:
    twice = [{"model": "a", "parameters": {"weight": 1}}] * 2
    with pytest.raises(ConfigError, match=r"modules\.t\.models\[1\]\.model: 'a' is already listed"):
        load_config({"merge_method": "linear", "modules": {"t": {"models": twice}}})


# --------------------------------------------------------------------------- slices refused


def test_layer_stacks_finds_both_stacks_of_bart(bart: dict[str, Path]) -> None:
    from alloykit.io.checkpoint import Checkpoint

    with Checkpoint(bart["base"]) as ckpt:
        assert layer_stacks(ckpt.tensors) == ["model.encoder.layers.", "model.decoder.layers."] or (
            layer_stacks(ckpt.tensors) == ["model.decoder.layers.", "model.encoder.layers."]
        )
    assert layer_stacks(["model.layers.0.mlp.experts.3.w1.weight", "model.norm.weight"]) == [
        "model.layers."
    ]


def test_slices_over_two_stacks_says_use_modules(bart: dict[str, Path]) -> None:
    sources = [{"model": str(bart[n]), "layer_range": [0, 2]} for n in ("a", "b")]
    config = {
        "merge_method": "linear",
        "slices": [{"sources": sources}],
        "parameters": {"weight": 1},
    }
    with pytest.raises(ConfigError) as caught:
        plan_merge(config)
    message = str(caught.value)
    assert "\n" not in message
    assert f"model '{bart['a']}' has 2 layer stacks" in message
    assert "'model.encoder.layers.'" in message and "'model.decoder.layers.'" in message
    assert (
        "use modules: {model.encoder: {slices: [...]}, model.decoder: {slices: [...]}}" in message
        or (
            "use modules: {model.decoder: {slices: [...]}, model.encoder: {slices: [...]}}"
            in message
        )
    )


# --------------------------------------------------------------------------- planning


def test_each_module_merges_with_its_own_parameters(bart: dict[str, Path]) -> None:
    config = _linear(
        bart,
        modules={
            ENCODER: {"models": _models(bart, 1.0, 0.0)},
            DECODER: {"models": _models(bart, 0.0, 1.0)},
        },
    )
    plan = plan_merge(config)
    state = merge_to_state_dict(config)
    a, b, base = (load_tensors(bart[n]) for n in ("a", "b", "base"))
    assert set(state) == set(base)
    for name, value in state.items():
        expected = a if name.startswith(ENCODER) else b if name.startswith(DECODER) else base
        np.testing.assert_allclose(value.double().numpy(), expected[name], rtol=0, atol=1e-6)
    outside = [n for n in base if not n.startswith((ENCODER + ".", DECODER + "."))]
    assert "model.shared.weight" in outside
    assert any(
        f"{len(outside)} tensors of model" in w and "under no module" in w for w in plan.warnings
    )


def test_module_parameters_rank_between_slice_and_top(bart: dict[str, Path]) -> None:
    encoder = {"models": [{"model": str(bart["a"])}, {"model": str(bart["b"])}]}
    decoder = {
        "models": [{"model": str(bart["a"])}, {"model": str(bart["b"])}],
        # a filter that matches only self_attn: other decoder tensors fall through to the top
        "parameters": {"weight": [{"filter": "self_attn", "value": 3.0}]},
    }
    config = _linear(
        bart,
        parameters={"weight": 2.0},
        modules={ENCODER: encoder, DECODER: decoder},
    )
    # inputs: a, b and the base (linear merges the base too, appended last)
    jobs = {job.output: job for job in plan_merge(config).jobs}
    assert jobs["model.encoder.layers.0.fc1.weight"].per_model["weight"] == (2.0, 2.0, 2.0)
    assert jobs["model.decoder.layers.1.self_attn.q_proj.weight"].per_model["weight"] == (3.0,) * 3
    assert jobs["model.decoder.layers.1.fc1.weight"].per_model["weight"] == (2.0, 2.0, 2.0)
    # the source's own parameters beat the module's
    decoder["models"][0]["parameters"] = {"weight": 5.0}  # type: ignore[index]
    jobs = {job.output: job for job in plan_merge(config).jobs}
    assert jobs["model.decoder.layers.0.self_attn.q_proj.weight"].per_model["weight"] == (
        5.0,
        3.0,
        3.0,
    )


def test_module_slices_pick_layers_of_one_stack(bart: dict[str, Path]) -> None:
    decoder = {"slices": [{"sources": [{"model": str(bart["b"]), "layer_range": [1, 2]}]}]}
    config = _linear(
        bart,
        parameters={"weight": 1.0},
        modules={ENCODER: {"models": _models(bart, 1.0, 0.0)}, DECODER: decoder},
    )
    plan = plan_merge(config)
    state = merge_to_state_dict(config)
    b = load_tensors(bart["b"])
    decoder_layers = {n.split(".")[3] for n in state if n.startswith("model.decoder.layers.")}
    assert decoder_layers == {"0"}
    np.testing.assert_allclose(
        state["model.decoder.layers.0.fc1.weight"].double().numpy(),
        b["model.decoder.layers.1.fc1.weight"],
        atol=1e-6,
    )
    assert plan.layers == 3  # two encoder layers and one decoder layer
    assert plan.config is not None
    assert (plan.config["encoder_layers"], plan.config["decoder_layers"]) == (2, 1)
    assert not any("layer(s) under" in w for w in plan.warnings)


def test_module_slices_output_loads_with_its_new_depth(
    bart: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import BartForConditionalGeneration

    decoder = {"slices": [{"sources": [{"model": str(bart["b"]), "layer_range": [1, 2]}]}]}
    config = _linear(
        bart,
        parameters={"weight": 1.0},
        modules={ENCODER: {"models": _models(bart, 1.0, 0.0)}, DECODER: decoder},
    )
    merge(config, tmp_path / "out")
    model, info = BartForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert model.config.decoder_layers == 1 and len(model.model.decoder.layers) == 1
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_layer_count_no_key_holds_is_a_warning(bart: dict[str, Path]) -> None:
    decoder = {"slices": [{"sources": [{"model": str(bart["b"]), "layer_range": [1, 2]}]}]}
    config = _linear(bart, parameters={"weight": 1.0}, modules={"model.decoder.layers": decoder})
    plan = plan_merge(config)
    assert any("1 layer(s) under 'model.decoder.layers.'" in w for w in plan.warnings)


def test_a_module_with_no_tensors_is_a_config_error(bart: dict[str, Path]) -> None:
    config = _linear(bart, modules={"encoder": {"models": _models(bart, 1.0, 1.0)}})
    with pytest.raises(
        ConfigError, match=r"^modules\.encoder: model '.*' has no tensors under 'encoder\.'"
    ):
        plan_merge(config)


def test_layer_stacks_of_vision_language_and_t5_names() -> None:
    llava = [
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.language_model.layers.0.mlp.up_proj.weight",
        "lm_head.weight",
    ]
    assert layer_stacks(llava) == [
        "model.vision_tower.vision_model.encoder.layers.",
        "model.language_model.layers.",
    ]
    assert stack_module_names(layer_stacks(llava)) == ["model.vision_tower", "model.language_model"]
    t5 = ["encoder.block.0.layer.1.DenseReluDense.wi.weight", "decoder.block.1.layer.0.x.weight"]
    assert layer_stacks(t5) == ["encoder.block.", "decoder.block."]
    assert stack_module_names(layer_stacks(t5)) == ["encoder", "decoder"]


def test_modules_recipe_round_trips_through_yaml(bart: dict[str, Path]) -> None:
    config = load_config(
        _linear(
            bart,
            modules={ENCODER: {"models": _models(bart, 1.0, 0.0), "parameters": {"weight": 2}}},
        )
    )
    again = load_config(config.to_yaml())
    assert again == config


def test_cli_merges_modules_and_the_output_loads(bart: dict[str, Path], tmp_path: Path) -> None:
    from transformers import BartForConditionalGeneration

    recipe = _linear(
        bart,
        modules={
            ENCODER: {"models": _models(bart, 0.5, 0.5)},
            DECODER: {"models": _models(bart, 0.0, 1.0)},
        },
    )
    path = write_yaml(tmp_path / "modules.yml", yaml.safe_dump(recipe))
    result = run_cli("merge", path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    model, info = BartForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a, b = load_tensors(bart["a"]), load_tensors(bart["b"])
    name = "model.encoder.layers.1.fc2.weight"
    merged = model.state_dict()[name].double().numpy()
    np.testing.assert_allclose(merged, 0.5 * a[name] + 0.5 * b[name], atol=1e-6)
