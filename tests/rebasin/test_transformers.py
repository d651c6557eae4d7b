"""Specs inferred for transformer blocks: MLP hidden units and whole attention heads."""

from __future__ import annotations

import copy

import pytest
import torch

from alloykit.rebasin import AxisPermutation, apply_permutations, infer_spec, weight_matching
from tests.rebasin.nets import assert_states_equal, random_permutations, state


def tiny(model_type: str, seed: int) -> torch.nn.Module:
    """A two-layer transformer of ``model_type`` with random weights (and non-zero biases)."""
    import transformers

    torch.manual_seed(seed)
    if model_type == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
    elif model_type == "gpt2":  # Conv1D weights (in, out) and a fused q|k|v projection
        config = transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=32
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
        model = transformers.BertModel(config, add_pooling_layer=False)
    with torch.no_grad():  # random biases, so that permuting them is tested too
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.02)
    return model.eval()


def output(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    result = model(input_ids=tokens)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_transformer_recovery_and_function(model_type: str) -> None:
    model = tiny(model_type, 0)
    weights = state(model)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    spec = infer_spec(shapes, model.config.to_dict(), model_type)
    layer_groups = {p.rsplit(".", 1)[1] for p in spec.sizes}
    assert layer_groups == {"mlp", "heads"}
    assert len(spec.sizes) == 4  # two layers, each an MLP group and a heads group
    heads = [size for perm, size in spec.sizes.items() if perm.endswith("heads")]
    assert heads == ([2, 2] if model_type == "llama" else [4, 4])
    scrambled = apply_permutations(spec, random_permutations(spec, 7), weights)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(scrambled)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(output(permuted, tokens), output(model, tokens))
    found = weight_matching(spec, weights, scrambled, seed=1)
    assert_states_equal(apply_permutations(spec, found.perms, scrambled), weights)


def test_gpt2_fused_qkv_permutes_three_blocks_of_heads() -> None:
    model = tiny("gpt2", 0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = infer_spec(shapes, model.config.to_dict(), "gpt2")
    assert spec.axes["transformer.h.0.attn.c_attn.weight"] == (
        None,
        AxisPermutation("transformer.h.0.heads", outer=3),
    )
    assert spec.axes["transformer.h.0.attn.c_proj.weight"] == (
        AxisPermutation("transformer.h.0.heads"),
        None,
    )


def test_without_a_config_only_the_mlps_are_permuted() -> None:
    model = tiny("llama", 0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = infer_spec(shapes, None, "llama")
    assert sorted(spec.sizes) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert spec.notes and "head count" in spec.notes[0]


def test_an_unknown_transformer_layout_asks_for_a_spec() -> None:
    from alloykit.rebasin import SpecError

    shapes = {  # Falcon-style names: the MLP modules are not in any known layout
        "transformer.word_embeddings.weight": (64, 32),
        "transformer.h.0.self_attention.query_key_value.weight": (96, 32),
        "transformer.h.0.self_attention.dense.weight": (32, 32),
        "transformer.h.0.mlp.dense_h_to_4h.weight": (128, 32),
        "transformer.h.0.mlp.dense_4h_to_h.weight": (32, 128),
    }
    with pytest.raises(SpecError, match="transformer layout .* is not one alloykit knows"):
        infer_spec(shapes, {"num_attention_heads": 4}, "falcon")
