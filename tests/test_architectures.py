"""Merges across Hugging Face architectures, with no per-architecture table in alloykit.

Six architectures (Llama, Mistral, Qwen2, Gemma3 text, GPT-2, BERT) in three dtypes: a slerp
merge and a passthrough frankenmerge of each must load in ``transformers`` with no missing,
unexpected or mismatched key and run a forward pass. The frankenmerge's layers must be the
source layers bit for bit (renumbered), its config must give the new depth under the
architecture's own key and rebuild per-layer lists (``layer_types``) from the layers taken, and
a tied head must stay tied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from alloykit import merge
from alloykit.architecture import split_layer_name
from alloykit.toymodels import ToySpec, make_family, model_class
from tests.helpers import load_tensors

# model_type -> tie_word_embeddings, as each architecture ships by default
ARCHITECTURES = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "gemma3_text": True,
    "gpt2": True,
    "bert": False,
}
DTYPES = ("float32", "float16", "bfloat16")
# Passthrough slices: ft1 layers [0, 3) then ft2 layers [1, 4): output layer i <- (model, layer).
FRANKEN_SOURCES = [("ft1", 0), ("ft1", 1), ("ft1", 2), ("ft2", 1), ("ft2", 2), ("ft2", 3)]
TOKEN_IDS = [[1, 5, 9, 17, 33, 2]]
HEADS = ("lm_head.weight",)


@dataclass(frozen=True)
class Case:
    spec: ToySpec
    family: dict[str, Path]

    @property
    def layer_key(self) -> str:
        return "n_layer" if self.spec.model_type == "gpt2" else "num_hidden_layers"


@pytest.fixture(
    scope="module",
    params=[(arch, dtype) for arch in ARCHITECTURES for dtype in DTYPES],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    arch, dtype = request.param
    spec = ToySpec(model_type=arch, dtype=dtype, tie_word_embeddings=ARCHITECTURES[arch])
    root = tmp_path_factory.mktemp(f"{arch}-{dtype}")
    return Case(spec, make_family(root, spec, finetunes=2, seed=0))


@pytest.fixture(scope="module")
def slerp_out(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {
        "merge_method": "slerp",
        "base_model": str(case.family["base"]),
        "models": [{"model": str(case.family["ft1"])}],
        "parameters": {"t": [0.0, 1.0]},
    }
    return merge(config, tmp_path_factory.mktemp("slerp") / "out").output


@pytest.fixture(scope="module")
def franken_out(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ft1, ft2 = str(case.family["ft1"]), str(case.family["ft2"])
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": ft1, "layer_range": [0, 3]}]},
            {"sources": [{"model": ft2, "layer_range": [1, 4]}]},
        ],
    }
    return merge(config, tmp_path_factory.mktemp("franken") / "out").output


def read_config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return config


def load_and_run(spec: ToySpec, folder: Path) -> torch.nn.Module:
    """Load ``folder`` as ``transformers`` would, check the keys, run a forward pass."""
    model, info = model_class(spec).from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert model.dtype == getattr(torch, spec.dtype)
    with torch.no_grad():
        output = model(torch.tensor(TOKEN_IDS))
    values = output.logits if hasattr(output, "logits") else output.last_hidden_state
    assert values.shape[:2] == (1, len(TOKEN_IDS[0]))
    assert torch.isfinite(values).all()
    return model


def test_slerp_loads_and_runs(case: Case, slerp_out: Path) -> None:
    load_and_run(case.spec, slerp_out)
    config = read_config(slerp_out)
    assert config["dtype"] == case.spec.dtype
    assert config[case.layer_key] == case.spec.num_hidden_layers


def test_slerp_ends_are_the_base_and_the_fine_tune(case: Case, slerp_out: Path) -> None:
    """t = 0 (embeddings, layer 0) gives the base; t = 1 (the last layer) the fine-tune."""
    merged = load_tensors(slerp_out)
    base, ft1 = load_tensors(case.family["base"]), load_tensors(case.family["ft1"])
    assert set(merged) == set(base)
    eps = float(torch.finfo(getattr(torch, case.spec.dtype)).eps)
    last = case.spec.num_hidden_layers - 1
    for name, value in merged.items():
        parts = split_layer_name(name)
        if parts is None or parts.index == 0:  # embeddings, final norm and head: t = 0
            np.testing.assert_array_equal(value, base[name], err_msg=name)
        elif parts.index == last:  # lerped when colinear: one rounding
            np.testing.assert_allclose(value, ft1[name], rtol=eps, atol=eps * 1e-3, err_msg=name)


def test_passthrough_loads_and_runs_with_the_new_depth(case: Case, franken_out: Path) -> None:
    model = load_and_run(case.spec, franken_out)
    assert model.config.num_hidden_layers == len(FRANKEN_SOURCES)  # attribute_map for n_layer
    config = read_config(franken_out)
    assert config[case.layer_key] == len(FRANKEN_SOURCES)
    assert config["dtype"] == case.spec.dtype


def test_passthrough_layers_are_the_sources_bit_for_bit(case: Case, franken_out: Path) -> None:
    merged = load_tensors(franken_out)
    inputs = {k: load_tensors(case.family[k]) for k in ("ft1", "ft2")}
    expected: dict[str, np.ndarray] = {}
    for name, value in inputs["ft1"].items():
        parts = split_layer_name(name)
        if parts is None:  # embeddings from the first slice, final norm (pooler) from the last
            last_slice = not any(w in name for w in ("embed", "wte", "wpe"))
            expected[name] = inputs["ft2"][name] if last_slice else value
            continue
        if parts.index == 0:
            for out_index, (model, layer) in enumerate(FRANKEN_SOURCES):
                expected[parts.renumber(out_index)] = inputs[model][parts.renumber(layer)]
    assert sorted(merged) == sorted(expected)
    for name, value in merged.items():
        assert np.array_equal(value, expected[name]), name


def test_passthrough_rebuilds_per_layer_lists(case: Case, franken_out: Path) -> None:
    sources = {k: read_config(case.family[k]) for k in ("ft1", "ft2")}
    config = read_config(franken_out)
    per_layer = [
        key
        for key, value in sources["ft1"].items()
        if isinstance(value, list) and key != "architectures"
    ]
    if case.spec.model_type in ("gemma3_text", "qwen2"):
        assert "layer_types" in per_layer
    for key in per_layer:
        expected = [sources[model][key][layer] for model, layer in FRANKEN_SOURCES]
        assert config[key] == expected, key
    if case.spec.model_type == "gemma3_text":  # every 3rd input layer is full attention
        assert config["layer_types"] == [
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ]


@pytest.mark.parametrize("which", ["slerp", "franken"])
def test_a_tied_head_stays_tied(case: Case, which: str, slerp_out: Path, franken_out: Path) -> None:
    out = slerp_out if which == "slerp" else franken_out
    stored_in_inputs = any(h in load_tensors(case.family["ft1"]) for h in HEADS)
    merged = load_tensors(out)
    config = read_config(out)
    if case.spec.tie_word_embeddings and case.spec.model_type != "bert":
        assert not stored_in_inputs
        assert not any(h in merged for h in HEADS)
        assert config["tie_word_embeddings"] is True
        model = load_and_run(case.spec, out)
        head = model.get_output_embeddings().weight
        assert torch.equal(head, model.get_input_embeddings().weight)
    else:
        assert all((h in merged) == stored_in_inputs for h in HEADS)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_a_head_only_the_fine_tune_stores_is_kept_and_untied(
    arch: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A tied base and an untied fine-tune: the output keeps the fine-tune's head, untied."""
    tied = ToySpec(model_type=arch, tie_word_embeddings=True)
    untied = ToySpec(model_type=arch, tie_word_embeddings=False)
    base = make_family(tmp_path_factory.mktemp(f"{arch}-tied"), tied, finetunes=0)["base"]
    ft = make_family(tmp_path_factory.mktemp(f"{arch}-untied"), untied, finetunes=1)["ft1"]
    assert "lm_head.weight" not in load_tensors(base)
    assert "lm_head.weight" in load_tensors(ft)
    config = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(ft)}],
        "parameters": {"t": 1.0},
    }
    out = merge(config, tmp_path_factory.mktemp(f"{arch}-mixed") / "out").output
    merged = load_tensors(out)
    assert "lm_head.weight" in merged
    assert read_config(out)["tie_word_embeddings"] is False
    load_and_run(untied, out)


def test_reordered_slices_of_the_same_depth_rebuild_layer_types(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Layers 2, 3 of ft1 then 0, 1 of ft2: as many layers as the inputs, in another order.

    Each output layer keeps the attention kind its weights were trained with, even when the
    depth does not change.
    """
    spec = ToySpec(model_type="gemma3_text", tie_word_embeddings=True)
    family = make_family(tmp_path_factory.mktemp("gemma-reorder"), spec, finetunes=2)
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(family["ft1"]), "layer_range": [2, 4]}]},
            {"sources": [{"model": str(family["ft2"]), "layer_range": [0, 2]}]},
        ],
    }
    out = merge(config, tmp_path_factory.mktemp("gemma-reordered") / "out").output
    source_types = read_config(family["ft1"])["layer_types"]
    assert source_types == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    config_out = read_config(out)
    assert config_out["num_hidden_layers"] == 4
    assert config_out["layer_types"] == [source_types[i] for i in (2, 3, 0, 1)]
    load_and_run(spec, out)
