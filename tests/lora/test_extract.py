"""LoRA extraction: reconstruction errors against NumPy's SVD, and adapters PEFT loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from alloykit.errors import AlloyError, IncompatibleModels
from alloykit.lora import ExtractOptions, extract_lora, read_adapter
from alloykit.lora.factorize import SvdOptions, factors, relative_error, spectrum
from alloykit.toymodels import ToySpec, make_family
from tests.lora.conftest import load_model, logits

Q_PROJ = "model.layers.1.self_attn.q_proj"


def _delta(family: dict[str, Path], name: str) -> np.ndarray:
    base = load_file(family["base"] / "model.safetensors")[name].double().numpy()
    tuned = load_file(family["ft1"] / "model.safetensors")[name].double().numpy()
    return tuned - base


def _optimal_error(matrix: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()))


def test_full_rank_reproduces_the_finetune(family: dict[str, Path], tmp_path: Path) -> None:
    result = extract_lora(family["base"], family["ft1"], tmp_path / "a", ExtractOptions(rank=999))
    assert result.modules and all(r.relative_error < 1e-5 for r in result.modules)
    assert any("above the full rank" in w for w in result.warnings)  # said once
    assert len([w for w in result.warnings if "full rank" in w]) == 1
    adapter = read_adapter(tmp_path / "a")
    for report in result.modules:
        expected = _delta(family, f"{report.module}.weight")
        np.testing.assert_allclose(adapter.update(report.module).numpy(), expected, atol=1e-7)
    # norms, embeddings and the head changed and are not LoRA targets: saved whole
    assert {"model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"} <= set(adapter.full)
    # PEFT loads it, and base + adapter is the fine-tune
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_model(family["base"]), str(tmp_path / "a"))
    torch.testing.assert_close(
        logits(peft_model), logits(load_model(family["ft1"])), atol=1e-5, rtol=0
    )
    saved = json.loads((tmp_path / "a" / "alloykit_extract.json").read_text())
    assert len(saved["modules"]) == len(result.modules)


def test_rank_r_error_is_the_optimal_one(family: dict[str, Path], tmp_path: Path) -> None:
    options = ExtractOptions(
        rank=5, modules=("q_proj", "v_proj"), svd=SvdOptions(precision="float64")
    )
    result = extract_lora(family["base"], family["ft1"], tmp_path / "a", options)
    assert {r.module.rsplit(".", 1)[1] for r in result.modules} == {"q_proj", "v_proj"}
    for report in result.modules:
        optimal = _optimal_error(_delta(family, f"{report.module}.weight"), 5)
        assert report.relative_error == pytest.approx(optimal, rel=1e-5)
        assert report.svd == "exact" and report.rank == 5
    # other Linear modules changed but were not selected: left out, said once
    assert any("not selected by --modules" in w for w in result.warnings)
    assert all("mlp" not in name for name in result.saved)

    # PEFT-loaded base + adapter = the base with q/v replaced by W + B A and the rest saved whole
    adapter = read_adapter(tmp_path / "a")
    state = load_model(family["base"]).state_dict()
    for module in adapter.modules:
        state[f"{module}.weight"] = (
            state[f"{module}.weight"].double() + adapter.update(module)
        ).float()
    state.update(adapter.full)
    expected = load_model(family["base"])
    expected.load_state_dict(state)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_model(family["base"]), str(tmp_path / "a"))
    torch.testing.assert_close(logits(peft_model), logits(expected), atol=1e-5, rtol=0)


@settings(max_examples=8, deadline=None)
@given(
    rank=st.integers(1, 6),
    decay=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**16),
)
def test_randomized_svd_is_within_one_percent_of_optimal(
    rank: int, decay: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((96, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 40)))
    matrix = (u * np.exp(-decay * np.arange(40))) @ v.T + 1e-3 * rng.standard_normal((96, 64))
    found = spectrum(torch.from_numpy(matrix), rank, "m", SvdOptions(exact_limit=0, seed=seed))
    assert found.kind == "randomized"
    b, a = factors(found, rank)
    error = relative_error(torch.from_numpy(matrix), b, a)
    assert error <= 1.01 * _optimal_error(matrix, rank)


def test_randomized_extraction_on_finetune_deltas(family: dict[str, Path], tmp_path: Path) -> None:
    options = ExtractOptions(
        rank=4, modules=("o_proj",), svd=SvdOptions(exact_limit=8, device="auto")
    )
    result = extract_lora(family["base"], family["ft1"], tmp_path / "a", options)
    for report in result.modules:
        assert report.svd == "randomized"
        optimal = _optimal_error(_delta(family, f"{report.module}.weight"), 4)
        assert optimal <= report.relative_error <= 1.01 * optimal


def test_energy_chooses_each_modules_rank(family: dict[str, Path], tmp_path: Path) -> None:
    options = ExtractOptions(energy=0.6, modules=("q_proj", "k_proj", "down_proj"))
    result = extract_lora(family["base"], family["ft1"], tmp_path / "a", options)
    for report in result.modules:
        s = np.linalg.svd(_delta(family, f"{report.module}.weight"), compute_uv=False) ** 2
        expected = int(np.searchsorted(np.cumsum(s) / s.sum(), 0.6 - 1e-9)) + 1
        assert report.rank == expected
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    ranks = {r.module: r.rank for r in result.modules}
    assert len(set(ranks.values())) > 1 and config["rank_pattern"]
    for module, rank in ranks.items():
        assert config["rank_pattern"].get(module, config["r"]) == rank
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == rank
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_model(family["base"]), str(tmp_path / "a"))
    adapter = read_adapter(tmp_path / "a")
    lora_layer = peft_model.get_submodule(f"base_model.model.{Q_PROJ}")
    peft_delta = lora_layer.get_delta_weight("default").double()
    torch.testing.assert_close(peft_delta, adapter.update(Q_PROJ), atol=1e-7, rtol=0)


def test_embeddings_and_head_as_lora(family: dict[str, Path], tmp_path: Path) -> None:
    options = ExtractOptions(rank=999, modules=("q_proj",), embeddings=True, head=True)
    result = extract_lora(family["base"], family["ft1"], tmp_path / "a", options)
    modules = {r.module for r in result.modules}
    assert {"model.embed_tokens", "lm_head"} <= modules
    adapter = read_adapter(tmp_path / "a")
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
    np.testing.assert_allclose(
        adapter.update("model.embed_tokens").numpy(),
        _delta(family, "model.embed_tokens.weight"),
        atol=1e-7,
    )


def test_gpt2_conv1d_full_rank_loads_in_peft(gpt2_family: dict[str, Path], tmp_path: Path) -> None:
    spec = ToySpec(model_type="gpt2", num_hidden_layers=2)
    result = extract_lora(
        gpt2_family["base"], gpt2_family["ft1"], tmp_path / "a", ExtractOptions(rank=64)
    )
    assert all(r.relative_error < 1e-5 for r in result.modules)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(
        load_model(gpt2_family["base"], spec), str(tmp_path / "a")
    )
    torch.testing.assert_close(
        logits(peft_model), logits(load_model(gpt2_family["ft1"], spec)), atol=1e-5, rtol=0
    )


def test_bad_rank_and_foreign_base(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AlloyError, match="positive"):
        extract_lora(family["base"], family["ft1"], tmp_path / "a", ExtractOptions(rank=0))
    with pytest.raises(AlloyError, match="did you mean 'q_proj'"):
        options = ExtractOptions(rank=2, modules=("qproj",))
        extract_lora(family["base"], family["ft1"], tmp_path / "a", options)
    other = make_family(
        tmp_path / "other", ToySpec(hidden_size=16, intermediate_size=32), finetunes=0
    )
    with pytest.raises(IncompatibleModels, match="extract from a fine-tune of this base"):
        extract_lora(other["base"], family["ft1"], tmp_path / "b", ExtractOptions(rank=4))
    assert not list(tmp_path.glob(".b*")) and not (tmp_path / "b").exists()


def test_changed_biases_load_in_peft(tmp_path: Path) -> None:
    # Qwen2 has q/k/v biases: those of adapted modules are saved through bias="lora_only"
    spec = ToySpec(model_type="qwen2", num_hidden_layers=2)
    models = make_family(tmp_path / "qwen2", spec, finetunes=1)
    result = extract_lora(models["base"], models["ft1"], tmp_path / "a", ExtractOptions(rank=64))
    assert "model.layers.0.self_attn.q_proj.bias" in result.saved
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only"
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_model(models["base"], spec), str(tmp_path / "a"))
    expected = logits(load_model(models["ft1"], spec))
    torch.testing.assert_close(logits(peft_model), expected, atol=1e-5, rtol=0)
    # read back as a base+adapter input, the adapter gives the fine-tune's tensors
    from alloykit.io.checkpoint import Checkpoint
    from alloykit.lora.checkpoint import AdaptedCheckpoint

    with Checkpoint(models["ft1"]) as tuned, Checkpoint(models["base"]) as base:
        adapted = AdaptedCheckpoint(base, read_adapter(tmp_path / "a"))
        for name in tuned.tensors:
            torch.testing.assert_close(adapted.read(name), tuned.read(name), atol=1e-6, rtol=0)


def test_bfloat16_sharded_checkpoints(sharded_family: dict[str, Path], tmp_path: Path) -> None:
    base, tuned = sharded_family["base"], sharded_family["ft1"]
    result = extract_lora(
        base, tuned, tmp_path / "a", ExtractOptions(rank=999, modules=("q_proj",))
    )
    adapter = read_adapter(tmp_path / "a")
    assert {lora.A.dtype for lora in adapter.modules.values()} == {torch.bfloat16}
    assert all(r.relative_error < 2e-2 for r in result.modules)  # bfloat16 factors
    from alloykit.io.checkpoint import Checkpoint
    from alloykit.lora.checkpoint import AdaptedCheckpoint

    with Checkpoint(base) as base_ckpt, Checkpoint(tuned) as tuned_ckpt:
        adapted = AdaptedCheckpoint(base_ckpt, adapter)
        name = "model.layers.2.self_attn.q_proj.weight"
        value = adapted.read(name)
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value.float(), tuned_ckpt.read(name).float(), atol=2e-3, rtol=0)
