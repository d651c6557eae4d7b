"""MoE assembly: outputs load in transformers, experts are copied bit for bit, errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloykit.errors import ConfigError, IncompatibleModels
from alloykit.moe import MoEOptions, build_moe
from alloykit.toymodels import ToySpec, make_family
from tests.moe.conftest import expert_config, load_model

PROMPT = torch.tensor([[1, 7, 20, 33, 5, 9]])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def mlp(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    state = tensors(folder)
    return {
        role: state[f"model.layers.{layer}.mlp.{role}_proj.weight"]
        for role in ("gate", "up", "down")
    }


def test_mixtral_from_llama_loads_and_copies_experts_bit_for_bit(
    family: dict[str, Path], tmp_path: Path
) -> None:
    experts = [family["ft1"], family["ft2"], family["ft3"]]
    config = expert_config(family["base"], experts, gate_mode="random")
    result = build_moe(config, tmp_path / "moe", MoEOptions(seed=0))
    assert result.architecture == "mixtral"
    assert any("not a power of two" in w for w in result.warnings)
    model = load_model(tmp_path / "moe")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    assert torch.isfinite(model(PROMPT).logits).all()

    out = tensors(tmp_path / "moe")
    base = tensors(family["base"])
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp.experts."
        for e, folder in enumerate(experts):
            source = mlp(folder, layer)
            assert torch.equal(out[prefix + "gate_up_proj"][e, :64], source["gate"])
            assert torch.equal(out[prefix + "gate_up_proj"][e, 64:], source["up"])
            assert torch.equal(out[prefix + "down_proj"][e], source["down"])
        assert out[f"model.layers.{layer}.mlp.gate.weight"].shape == (3, 32)
    trunk = [n for n in base if ".mlp." not in n]
    assert trunk and all(torch.equal(out[n], base[n]) for n in trunk)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_identical_experts_with_one_per_token_reproduce_the_dense_model(
    model_type: str, family: dict[str, Path], qwen3_family: dict[str, Path], tmp_path: Path
) -> None:
    """top-1 routing weight is renormalised to 1, so any choice of identical experts is the MLP."""
    dense = (family if model_type == "llama" else qwen3_family)["ft1"]
    config = expert_config(
        dense, [dense, dense, dense, dense], gate_mode="random", experts_per_token=1
    )
    build_moe(config, tmp_path / "moe", MoEOptions(seed=3))
    moe = load_model(tmp_path / "moe")
    assert (
        type(moe).__name__
        == {"llama": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}[model_type]
    )
    with torch.no_grad():
        expected = load_model(dense)(PROMPT).logits
        got = moe(PROMPT).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_qwen2_moe_with_a_shared_expert(qwen2_family: dict[str, Path], tmp_path: Path) -> None:
    config = expert_config(
        qwen2_family["base"], [qwen2_family["ft1"], qwen2_family["ft2"]], gate_mode="cheap_embed"
    )
    config["shared_experts"] = [
        {"source_model": str(qwen2_family["base"]), "positive_prompts": ["w90 w91"]}
    ]
    result = build_moe(config, tmp_path / "moe", MoEOptions(seed=0))
    assert result.architecture == "qwen2_moe"
    model = load_model(tmp_path / "moe")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config.qkv_bias and model.config.norm_topk_prob
    assert torch.isfinite(model(PROMPT).logits).all()
    out, base = tensors(tmp_path / "moe"), tensors(qwen2_family["base"])
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        for e, name in enumerate(["ft1", "ft2"]):
            source = mlp(qwen2_family[name], layer)
            fused = out[prefix + "mlp.experts.gate_up_proj"][e]
            assert torch.equal(fused, torch.cat([source["gate"], source["up"]]))
            assert torch.equal(out[prefix + "mlp.experts.down_proj"][e], source["down"])
        for role, tensor in mlp(qwen2_family["base"], layer).items():
            assert torch.equal(out[f"{prefix}mlp.shared_expert.{role}_proj.weight"], tensor)
        assert torch.equal(
            out[prefix + "self_attn.q_proj.bias"], base[prefix + "self_attn.q_proj.bias"]
        )
        assert out[prefix + "mlp.shared_expert_gate.weight"].shape == (1, 32)


def test_qwen2_moe_from_llama_experts_has_no_attention_bias(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = expert_config(family["base"], [family["ft1"], family["ft2"]], gate_mode="random")
    config["architecture"] = "qwen"  # a prefix, as MergeKit accepts
    config["shared_experts"] = [{"source_model": str(family["base"])}]
    assert build_moe(config, tmp_path / "moe", MoEOptions(seed=0)).architecture == "qwen2_moe"
    model = load_model(tmp_path / "moe")
    assert not model.config.qkv_bias
    assert torch.isfinite(model(PROMPT).logits).all()


def test_dtype_noise_and_residual_scale(family: dict[str, Path], tmp_path: Path) -> None:
    config = expert_config(family["base"], [family["ft1"], family["ft2"]], gate_mode="random")
    config["experts"][0]["residual_scale"] = 0.5
    config["experts"][1]["noise_scale"] = 0.01
    config["dtype"] = "bfloat16"
    for run in ("a", "b"):
        build_moe(config, tmp_path / run, MoEOptions(seed=1))
    out, again = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert all(torch.equal(out[n], again[n]) for n in out)  # the seed fixes the noise
    down = out["model.layers.1.mlp.experts.down_proj"]
    source = mlp(family["ft1"], 1)["down"]
    assert torch.equal(down[0], (source * 0.5).to(torch.bfloat16))
    noisy = down[1].float() - mlp(family["ft2"], 1)["down"]
    assert 0.005 < float(noisy.std()) < 0.02
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"


def test_expert_of_another_size_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    other = make_family(tmp_path / "wide", ToySpec(intermediate_size=48), finetunes=0)["base"]
    config = expert_config(family["base"], [family["ft1"], other], gate_mode="random")
    with pytest.raises(IncompatibleModels, match=r"does not match the base.*mlp"):
        build_moe(config, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    assert not list(tmp_path.glob(".moe*"))


def test_expert_of_another_architecture_is_refused(
    family: dict[str, Path], qwen2_family: dict[str, Path], tmp_path: Path
) -> None:
    config = expert_config(family["base"], [family["ft1"], qwen2_family["ft1"]], gate_mode="random")
    with pytest.raises(IncompatibleModels, match="'qwen2' model and the base"):
        build_moe(config, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_output_architecture_that_cannot_take_the_experts(
    family: dict[str, Path], qwen2_family: dict[str, Path], tmp_path: Path
) -> None:
    qwen = expert_config(qwen2_family["base"], [qwen2_family["ft1"]], gate_mode="random")
    qwen["experts_per_token"] = 1
    with pytest.raises(IncompatibleModels, match="mixtral cannot take 'qwen2'.*use qwen2_moe"):
        build_moe({**qwen, "architecture": "mixtral"}, tmp_path / "a")
    with pytest.raises(IncompatibleModels, match="qwen2_moe.*need.*1 shared expert"):
        build_moe(qwen, tmp_path / "b")  # Qwen2 experts fit only Qwen2-MoE, which has one
    llama = expert_config(family["base"], [family["ft1"]], gate_mode="random")
    llama["experts_per_token"] = 1
    with pytest.raises(IncompatibleModels, match="qwen3_moe cannot take 'llama'"):
        build_moe({**llama, "architecture": "qwen3_moe"}, tmp_path / "c")
    with pytest.raises(IncompatibleModels, match="not one of mixtral, qwen2_moe, qwen3_moe"):
        build_moe({**llama, "architecture": "deepseek"}, tmp_path / "d")
    assert not list(tmp_path.iterdir())


def test_config_problems_are_reported_together(family: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "base_model": str(family["base"]),
        "gate_mode": "hidden",
        "experts_per_token": 3,
        "dtype": "int4",
        "experts": [
            {"source_model": str(family["ft1"]), "positive_prompts": ["w1"]},
            {"source_model": str(family["ft2"])},
        ],
    }
    with pytest.raises(ConfigError) as caught:
        build_moe(config, tmp_path / "moe")
    problems = caught.value.problems
    assert any(p.startswith("experts_per_token: 3 is more than the 2") for p in problems)
    assert any(p.startswith("experts[1].positive_prompts:") for p in problems)
    assert any(p.startswith("dtype: 'int4'") for p in problems)
    same = {**config, "experts_per_token": 1, "dtype": None}
    same["experts"] = [
        {"source_model": str(family[n]), "positive_prompts": ["w1"]} for n in ("ft1", "ft2")
    ]
    with pytest.raises(ConfigError, match="same prompts"):
        build_moe(same, tmp_path / "moe")
    shared = {**same, "experts": config["experts"][:1], "shared_experts": same["experts"][1:]}
    shared["shared_experts"][0]["positive_prompts"] = []
    with pytest.raises(ConfigError, match=r"shared_experts\[0\]\.positive_prompts"):
        build_moe(shared, tmp_path / "moe")
    with pytest.raises(ConfigError, match=r"experts\[0\]\.sourse_model"):
        build_moe({"base_model": "x", "experts": [{"sourse_model": "y"}]}, tmp_path / "moe")


def test_base_merge_merges_the_trunk_with_a_catalogue_method(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from alloykit.pipeline import merge_to_state_dict

    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.7}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.4}},
        ],
    }
    config = expert_config(family["base"], [family["ft1"], family["ft2"]], gate_mode="random")
    config["base_merge"] = recipe
    build_moe(config, tmp_path / "moe", MoEOptions(seed=0))
    out, merged = tensors(tmp_path / "moe"), merge_to_state_dict(recipe)
    trunk = [n for n in merged if ".mlp." not in n]
    assert trunk and all(torch.equal(out[n], merged[n]) for n in trunk)
    assert not torch.equal(out[trunk[0]], tensors(family["base"])[trunk[0]])
    down = out["model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(down[1], mlp(family["ft2"], 2)["down"])
    load_model(tmp_path / "moe")
    written = (tmp_path / "moe" / "alloykit_moe_config.yml").read_text()
    assert "task_arithmetic" in written
    build_moe(tmp_path / "moe" / "alloykit_moe_config.yml", tmp_path / "again", MoEOptions(seed=0))
    again = tensors(tmp_path / "again")
    assert all(torch.equal(out[n], again[n]) for n in out)

    bad = {**config, "base_merge": {**recipe, "merge_method": "tiess"}}
    with pytest.raises(ConfigError, match=r"base_merge\..*tiess"):
        build_moe(bad, tmp_path / "bad")
    qwen = make_family(tmp_path / "qwen", ToySpec(model_type="qwen2"), finetunes=1)
    other = {
        **config,
        "base_merge": {
            **recipe,
            "base_model": str(qwen["base"]),
            "models": [{"model": str(qwen["ft1"]), "parameters": {"weight": 1.0}}],
        },
    }
    with pytest.raises(IncompatibleModels, match="base_merge: model .* is a 'qwen2' model"):
        build_moe(other, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_per_expert_layout_of_older_transformers(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers 4 names Mixtral's experts block_sparse_moe.experts.N.w1/w2/w3: the layout
    is read from the model transformers builds, so that layout is written when it is the one
    built. transformers 5 still loads it (converting), and the model is the same."""
    import alloykit.moe.plan as planning

    fused_parameters = planning.meta_parameters

    def per_expert(config: dict[str, object]) -> dict[str, tuple[int, ...]]:
        layout: dict[str, tuple[int, ...]] = {}
        for name, shape in fused_parameters(config).items():
            prefix, _, leaf = name.partition(".mlp.")
            if leaf == "gate.weight":
                layout[f"{prefix}.block_sparse_moe.gate.weight"] = shape
            elif leaf.startswith("experts."):
                experts, rows, columns = shape
                for e in range(experts):
                    moe = f"{prefix}.block_sparse_moe.experts.{e}"
                    if leaf == "experts.gate_up_proj":
                        layout[f"{moe}.w1.weight"] = layout[f"{moe}.w3.weight"] = (
                            rows // 2,
                            columns,
                        )
                    else:
                        layout[f"{moe}.w2.weight"] = (rows, columns)
            else:
                layout[name] = shape
        return layout

    config = expert_config(family["base"], [family["ft1"], family["ft2"]], gate_mode="random")
    build_moe(config, tmp_path / "fused", MoEOptions(seed=0))
    monkeypatch.setattr(planning, "meta_parameters", per_expert)
    build_moe(config, tmp_path / "legacy", MoEOptions(seed=0))
    legacy = tensors(tmp_path / "legacy")
    assert not any("experts.gate_up_proj" in n for n in legacy)
    for e, name in enumerate(["ft1", "ft2"]):
        source = mlp(family[name], 3)
        moe = f"model.layers.3.block_sparse_moe.experts.{e}."
        assert torch.equal(legacy[moe + "w1.weight"], source["gate"])
        assert torch.equal(legacy[moe + "w3.weight"], source["up"])
        assert torch.equal(legacy[moe + "w2.weight"], source["down"])
    with torch.no_grad():
        expected = load_model(tmp_path / "fused")(PROMPT).logits
        got = load_model(tmp_path / "legacy")(PROMPT).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_plan_names_each_tensor_source_without_reading_tensors(
    qwen2_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alloykit.io.checkpoint import Checkpoint
    from alloykit.moe import plan_moe

    def no_reads(self: Checkpoint, name: str) -> torch.Tensor:
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    config = expert_config(
        qwen2_family["base"], [qwen2_family["ft1"], qwen2_family["ft2"]], gate_mode="hidden"
    )
    config["shared_experts"] = [
        {"source_model": str(qwen2_family["base"]), "positive_prompts": ["w9"]}
    ]
    plan = plan_moe(config)
    rows = {name: source for name, _, source in plan.rows()}
    ft1, ft2, base = (str(qwen2_family[n]) for n in ("ft1", "ft2", "base"))
    prefix = "model.layers.2.mlp."
    assert rows[prefix + "experts.gate_up_proj"] == f"gate_proj+up_proj of {ft1}, {ft2}"
    assert rows[prefix + "shared_expert.down_proj.weight"] == f"down_proj of {base}"
    assert rows[prefix + "gate.weight"] == "gate_mode hidden"
    assert rows[prefix + "shared_expert_gate.weight"] == "gate_mode hidden (shared expert)"
    assert rows["model.layers.2.self_attn.q_proj.bias"] == "base_model"
    assert plan.architecture == "qwen2_moe" and not plan.warnings
