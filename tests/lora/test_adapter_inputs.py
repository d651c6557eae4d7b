"""``base+adapter`` merge inputs: the adapter applied on the fly equals PEFT's merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alloykit.errors import AlloyError
from alloykit.pipeline import merge_to_state_dict
from alloykit.toymodels import ToySpec
from tests.lora.conftest import make_adapter, merged_dense, run_alloykit

MIXED = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
    "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
    "alpha_pattern": {"model.layers.2.self_attn.v_proj": 3},
    "modules_to_save": ["model.norm"],
}


def _recipe(base: Path, other: Path, adapted: str) -> dict[str, object]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(other), "parameters": {"weight": 0.5}},
            {"model": adapted, "parameters": {"weight": 0.7}},
        ],
    }


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_input_equals_merge_and_unload(
    family: dict[str, Path], tmp_path: Path, rslora: bool
) -> None:
    adapter = make_adapter(family["base"], tmp_path / "adapter", use_rslora=rslora, **MIXED)
    dense = merged_dense(family["base"], adapter, tmp_path / "dense")
    on_the_fly = merge_to_state_dict(
        _recipe(family["base"], family["ft1"], f"{family['base']}+{adapter}")
    )
    reference = merge_to_state_dict(_recipe(family["base"], family["ft1"], str(dense)))
    assert on_the_fly.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(on_the_fly[name], tensor, atol=2e-7, rtol=1e-6, msg=name)
    # the adapter did change the merge
    plain = merge_to_state_dict(_recipe(family["base"], family["ft1"], str(family["base"])))
    changed = [n for n in plain if not torch.equal(plain[n], reference[n])]
    assert "model.layers.1.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed
    assert "model.layers.0.mlp.up_proj.weight" not in changed


def test_conv1d_adapter_input(gpt2_family: dict[str, Path], tmp_path: Path) -> None:
    spec = ToySpec(model_type="gpt2", num_hidden_layers=2)
    adapter = make_adapter(
        gpt2_family["base"],
        tmp_path / "adapter",
        spec,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
    )
    dense = merged_dense(gpt2_family["base"], adapter, tmp_path / "dense", spec)
    base, ft = gpt2_family["base"], gpt2_family["ft1"]
    on_the_fly = merge_to_state_dict(_recipe(base, ft, f"{base}+{adapter}"))
    reference = merge_to_state_dict(_recipe(base, ft, str(dense)))
    for name, tensor in reference.items():
        torch.testing.assert_close(on_the_fly[name], tensor, atol=2e-7, rtol=1e-6, msg=name)


def _one_error_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe: dict[str, object]
) -> str:
    import yaml

    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = run_alloykit(capsys, "merge", path, tmp_path / "merged")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, stderr
    assert not (tmp_path / "merged").exists()
    return lines[0]


def test_adapter_errors(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alloykit.toymodels import make_family

    base = family["base"]
    other = make_family(
        tmp_path / "other", ToySpec(hidden_size=16, intermediate_size=32), finetunes=0
    )
    foreign = make_adapter(other["base"], tmp_path / "foreign")
    line = _one_error_line(capsys, tmp_path, _recipe(base, family["ft1"], f"{base}+{foreign}"))
    assert "trained on another base" in line and "q_proj" in line

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlloyError, match="no adapter_config.json"):
        merge_to_state_dict(_recipe(base, family["ft1"], f"{base}+{empty}"))

    dora = make_adapter(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(AlloyError, match="DoRA"):
        merge_to_state_dict(_recipe(base, family["ft1"], f"{base}+{dora}"))

    ia3 = tmp_path / "ia3"
    from peft import IA3Config, get_peft_model

    from tests.lora.conftest import load_model

    get_peft_model(
        load_model(base), IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    ).save_pretrained(str(ia3))
    with pytest.raises(AlloyError, match="IA3 adapter"):
        merge_to_state_dict(_recipe(base, family["ft1"], f"{base}+{ia3}"))

    broken = make_adapter(base, tmp_path / "broken")
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 8
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AlloyError, match="inconsistent ranks"):
        merge_to_state_dict(_recipe(base, family["ft1"], f"{base}+{broken}"))
