"""Tensor-name anatomy: layers, positions and module kinds across architectures."""

from __future__ import annotations

import pytest

from alloykit.architecture import module_kind, split_layer_name, tensor_position


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.embed_tokens.weight", "embedding"),
        ("transformer.wte.weight", "embedding"),
        ("transformer.wpe.weight", "embedding"),
        ("bert.embeddings.word_embeddings.weight", "embedding"),
        ("lm_head.weight", "head"),
        ("model.norm.weight", "norm"),
        ("transformer.ln_f.weight", "norm"),
        ("model.layers.3.input_layernorm.weight", "norm"),
        ("model.layers.3.self_attn.q_proj.weight", "attention"),
        ("transformer.h.1.attn.c_attn.weight", "attention"),
        ("bert.encoder.layer.0.attention.output.dense.weight", "attention"),
        ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
        ("model.layers.3.mlp.down_proj.weight", "mlp"),
        ("transformer.h.1.mlp.c_fc.weight", "mlp"),
        ("bert.encoder.layer.0.intermediate.dense.weight", "mlp"),
        ("bert.encoder.layer.0.output.dense.weight", "mlp"),
        ("bert.pooler.dense.weight", None),
    ],
)
def test_module_kind(name: str, kind: str | None) -> None:
    assert module_kind(name) == kind


def test_positions_and_layer_names() -> None:
    stack = "model.layers."
    assert tensor_position("model.embed_tokens.weight", stack) == "pre"
    assert tensor_position("model.layers.0.mlp.up_proj.weight", stack) == "layer"
    assert tensor_position("lm_head.weight", stack) == "post"
    assert tensor_position("model.norm.weight", stack) == "post"
    parts = split_layer_name("transformer.h.11.attn.c_proj.bias")
    assert parts is not None and (parts.prefix, parts.index, parts.rest) == (
        "transformer.h.",
        11,
        "attn.c_proj.bias",
    )
    assert parts.renumber(2) == "transformer.h.2.attn.c_proj.bias"
