"""Router initialisation: hidden-state gates route prompts to their expert; the other modes
match their formulas; a seed fixes every gate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alloykit.io.checkpoint import Checkpoint
from alloykit.moe import Expert, MoEOptions, build_moe
from alloykit.moe.gates import degenerate_layers, gate_weights
from tests.moe.conftest import expert_config, load_model

# Three experts, each described by prompts made of its own words.
PROMPTS = [
    ["w3 w4 w5 w6", "w5 w6 w7", "w4 w7 w3 w3"],
    ["w40 w41 w42 w43", "w42 w44 w41", "w43 w40 w44"],
    ["w80 w81 w82 w83", "w82 w84 w81", "w83 w80 w84"],
]


def gates(folder: Path) -> torch.Tensor:
    """The routers of a built model, (layers, experts, hidden)."""
    state = load_file(folder / "model.safetensors")
    names = sorted(n for n in state if n.endswith("mlp.gate.weight"))
    return torch.stack([state[n] for n in sorted(names, key=lambda n: int(n.split(".")[2]))])


def test_hidden_gates_route_each_prompt_to_its_expert(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "base_model": str(family["base"]),
        "gate_mode": "hidden",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(family[f"ft{i + 1}"]), "positive_prompts": prompts}
            for i, prompts in enumerate(PROMPTS)
        ],
    }
    build_moe(config, tmp_path / "moe")
    model = load_model(tmp_path / "moe")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(tmp_path / "moe"))
    for expert, prompts in enumerate(PROMPTS):
        for prompt in prompts:
            ids = [
                tokenizer.bos_token_id,
                *tokenizer(prompt, add_special_tokens=False)["input_ids"],
            ]
            with torch.no_grad():
                logits = model(torch.tensor([ids]), output_router_logits=True).router_logits
            chosen = [int(layer[-1].argmax()) for layer in logits]  # the last token, per layer
            assert sum(c == expert for c in chosen) > len(chosen) / 2, (prompt, chosen)


def test_hidden_gates_are_normalised_differences_of_layer_inputs(family: dict[str, Path]) -> None:
    """The formula, recomputed from transformers' hidden states: mean(positive) - mean(negative)."""
    from transformers import AutoModelForCausalLM

    positive, negative = ["w3 w4", "w9 w10 w11"], ["w50 w51"]
    expert = Expert.model_validate(
        {
            "source_model": str(family["ft1"]),
            "positive_prompts": positive,
            "negative_prompts": negative,
        }
    )
    with Checkpoint(family["base"]) as base:
        got = gate_weights(
            "hidden", [expert], base, layers=4, hidden=32, seed=0, device=torch.device("cpu")
        )[:, 0]
    model = AutoModelForCausalLM.from_pretrained(str(family["base"]), dtype=torch.float32)

    def last_states(prompt: str) -> np.ndarray:
        ids = [1] + [3 + int(w[1:]) for w in prompt.split()]  # <s> then w<i> has id 3 + i
        with torch.no_grad():
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        return np.stack([s[0, -1].double().numpy() for s in states[:4]])

    vector = np.mean([last_states(p) for p in positive], 0) - last_states(negative[0])
    expected = vector / np.linalg.norm(vector, axis=1, keepdims=True)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_cheap_embed_gates_are_normalised_sums_of_token_embeddings(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = expert_config(family["base"], [family["ft1"], family["ft2"]], gate_mode="cheap_embed")
    build_moe(config, tmp_path / "moe")
    got = gates(tmp_path / "moe")
    embedding = load_file(family["base"] / "model.safetensors")["model.embed_tokens.weight"]
    for e, words in enumerate([(3, 4, 5), (13, 14, 15)]):
        total = embedding[[3 + w for w in words]].double().sum(0)
        expected = (total / total.norm()).float()
        for layer in range(4):
            torch.testing.assert_close(got[layer, e], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_are_fixed_by_the_seed(
    mode: str, family: dict[str, Path], tmp_path: Path
) -> None:
    config = expert_config(family["base"], [family["ft1"], family["ft2"]], gate_mode=mode)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        build_moe(config, tmp_path / name, MoEOptions(seed=seed))
    a, b, c = (gates(tmp_path / n) for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    if mode == "uniform_random":
        bound = 1 / math.sqrt(32)
        assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.8 * bound
    else:
        assert 0.8 < float(a.std()) < 1.2


def test_degenerate_gates_are_detected() -> None:
    rows = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    rows[1, 2] = rows[1, 0] + 1e-3 * rows[1, 1]  # layer 1: two experts almost the same
    assert degenerate_layers(rows) == [1]


def test_prompt_gates_need_the_base_tokenizer(family: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from alloykit.errors import AlloyError, CheckpointError

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(family["base"] / name, bare / name)
    config = expert_config(bare, [family["ft1"], family["ft2"]], gate_mode="cheap_embed")
    with pytest.raises(CheckpointError, match="cannot load its tokenizer.*gate_mode: random"):
        build_moe(config, tmp_path / "moe")
    with pytest.raises(AlloyError, match="--device 'tpu9'"):
        build_moe(config, tmp_path / "moe", MoEOptions(device="tpu9"))
    assert not (tmp_path / "moe").exists()
    build_moe({**config, "gate_mode": "random"}, tmp_path / "moe", MoEOptions(seed=0))
    assert not (tmp_path / "moe" / "tokenizer.json").exists()
