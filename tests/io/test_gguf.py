"""GGUF inputs: tiny Llamas written with gguf's writer the way llama.cpp's converter lays them out."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from alloykit import merge, merge_to_state_dict
from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import open_checkpoint
from tests.helpers import load_tensors

SPEC = {"heads": 4, "kv_heads": 2, "hidden": 32, "intermediate": 64, "layers": 4, "vocab": 128}
_LAYER_NAMES = {  # Hugging Face module -> GGUF name, as llama.cpp's converter renames them
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, index, *module, leaf = hf_name.split(".")
    return f"blk.{index}.{_LAYER_NAMES['.'.join(module)]}.{leaf}"


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reordering of query/key rows for its rope."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(path: Path, tensors: dict[str, np.ndarray], kind: str) -> Path:
    """Write ``tensors`` (a Llama state dict) as llama.cpp does: ``kind`` is F32, F16 (matrices
    in float16, vectors in float32), Q8_0 or Q4_1 (matrices quantised)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(SPEC["hidden"])
    writer.add_block_count(SPEC["layers"])
    writer.add_feed_forward_length(SPEC["intermediate"])
    writer.add_head_count(SPEC["heads"])
    writer.add_head_count_kv(SPEC["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(SPEC["vocab"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, values in tensors.items():
        values = values.astype(np.float32)
        if name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, SPEC["heads"])
        elif name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, SPEC["kv_heads"])
        if kind == "F16" and values.ndim == 2:
            writer.add_tensor(gguf_name(name), values.astype(np.float16))
        elif kind in ("Q8_0", "Q4_1") and values.ndim == 2:
            quant_type = gguf.GGMLQuantizationType[kind]
            quantised = gguf.quants.quantize(values, quant_type)
            writer.add_tensor(gguf_name(name), quantised, raw_dtype=quant_type)
        else:
            writer.add_tensor(gguf_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def ggufs(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ft1 of the toy family as F32, F16 and Q8_0 GGUF files (the F32 one alone in a folder)."""
    root = tmp_path_factory.mktemp("gguf")
    tensors = load_tensors(family["ft1"])
    (root / "f32").mkdir()
    return {
        "F32": write_gguf(root / "f32" / "ft1-f32.gguf", tensors, "F32"),
        "F16": write_gguf(root / "ft1-f16.gguf", tensors, "F16"),
        "Q8_0": write_gguf(root / "ft1-q8_0.gguf", tensors, "Q8_0"),
    }


def test_f32_gguf_reads_back_the_hugging_face_tensors(
    ggufs: dict[str, Path], family: dict[str, Path]
) -> None:
    expected = load_tensors(family["ft1"])
    with open_checkpoint(ggufs["F32"].parent) as checkpoint:  # a folder with one .gguf
        assert set(checkpoint.tensors) == set(expected)
        assert checkpoint.config is not None
        assert checkpoint.config["model_type"] == "llama"
        assert checkpoint.config["architectures"] == ["LlamaForCausalLM"]
        assert checkpoint.config["num_hidden_layers"] == SPEC["layers"]
        assert checkpoint.config["num_key_value_heads"] == SPEC["kv_heads"]
        for name, values in expected.items():
            tensor = checkpoint.read(name)
            assert tensor.dtype == torch.float32
            np.testing.assert_array_equal(tensor.numpy(), values, err_msg=name)


def test_q8_0_gguf_is_dequantised_on_read(ggufs: dict[str, Path], family: dict[str, Path]) -> None:
    expected = load_tensors(family["ft1"])
    with open_checkpoint(ggufs["Q8_0"]) as checkpoint:
        name = "model.layers.2.self_attn.k_proj.weight"
        assert checkpoint.tensors[name].dtype == "F32"
        values = checkpoint.read(name).numpy()
        # Q8_0: 8-bit integers times a float16 scale per 32 values: about half a step of error
        blocks = expected[name].reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        error = np.abs(values.reshape(-1, 32) - blocks)
        assert (error <= step * (0.5 + 127 * 2.0**-11)).all()  # and the float16 scale
        assert error.max() > 0  # it was quantised, and the permutation was undone
        np.testing.assert_array_equal(
            checkpoint.read("model.norm.weight").numpy(), expected["model.norm.weight"]
        )


def test_linear_merge_with_gguf_equals_merge_with_its_safetensors_twin(
    ggufs: dict[str, Path], family: dict[str, Path]
) -> None:
    def linear(first: Path) -> dict[str, torch.Tensor]:
        return merge_to_state_dict(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(family["ft2"]), "parameters": {"weight": 0.6}},
                    {"model": str(first), "parameters": {"weight": 0.4}},
                ],
            }
        )

    twin = linear(family["ft1"])
    from_f32 = linear(ggufs["F32"])
    from_f16 = linear(ggufs["F16"])
    assert set(from_f32) == set(twin) == set(from_f16)
    for name, value in twin.items():
        assert torch.equal(from_f32[name], value), name
        ft1 = load_tensors(family["ft1"])[name]
        rounding = 0.4 * np.abs(ft1) * 2.0**-11 if ft1.ndim == 2 else 0.0 * ft1
        np.testing.assert_array_less(
            np.abs(from_f16[name].numpy() - value.numpy()), rounding + 1e-7, err_msg=name
        )


def test_slerp_with_gguf_base_writes_a_loadable_model(
    ggufs: dict[str, Path], family: dict[str, Path], tmp_path: Path
) -> None:
    def slerp(base: Path, out: Path) -> Path:
        config = {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(family["ft3"])}],
            "parameters": {"t": 0.3},
        }
        return merge(config, out).output

    twin = slerp(family["ft1"], tmp_path / "twin")
    output = slerp(ggufs["F32"], tmp_path / "gguf")
    twin_tensors, tensors = load_tensors(twin), load_tensors(output)
    assert set(tensors) == set(twin_tensors)
    for name, value in twin_tensors.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(output), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_truncated_gguf_is_a_one_line_error_naming_the_file(
    ggufs: dict[str, Path], tmp_path: Path
) -> None:
    data = ggufs["F16"].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated.gguf': .*truncated") as error:
        open_checkpoint(truncated)
    assert "\n" not in str(error.value)
    headless = tmp_path / "headless.gguf"
    headless.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="headless.gguf': not a readable GGUF") as error:
        open_checkpoint(headless)
    assert "\n" not in str(error.value)
    corrupted = tmp_path / "corrupted.gguf"
    corrupted.write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match="corrupted.gguf': not a readable GGUF") as error:
        open_checkpoint(corrupted)
    assert "\n" not in str(error.value)


def test_folder_with_several_ggufs_asks_for_one(ggufs: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="holds 2 GGUF files"):
        open_checkpoint(ggufs["F16"].parent)


def test_only_the_tensor_read_is_dequantised(
    ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    dequantize = gguf.quants.dequantize

    def counting(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        calls.append(data.shape)
        return dequantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    with open_checkpoint(ggufs["Q8_0"]) as checkpoint:
        assert calls == []  # opening reads the header and tensor table only
        checkpoint.read("model.layers.1.mlp.down_proj.weight")
        assert calls == [(32, 64 // 32 * 34)]  # one tensor's rows of Q8_0 blocks (34 bytes)
        checkpoint.read("model.layers.1.input_layernorm.weight")  # float32: no dequantising
        assert len(calls) == 1
