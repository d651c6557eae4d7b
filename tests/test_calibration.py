"""Calibration data, statistics and the data-aware merges end to end on tiny Llama models."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alloykit import calibration as calibration_module
from alloykit.calibration import (
    fisher_statistics,
    input_statistics,
    load_model,
    model_statistics,
    streamed_model,
    token_blocks,
)
from alloykit.config import CalibrationConfig, load_config
from alloykit.errors import CalibrationError, ConfigError
from alloykit.io.checkpoint import Checkpoint
from alloykit.pipeline import merge_to_state_dict
from alloykit.toymodels import ToySpec, make_family

SAMPLES, LENGTH = 4, 12


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL file of toy-vocabulary sentences (the toy tokenizer knows w0..w124)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "calibration.jsonl"
    lines = [
        json.dumps({"text": " ".join(f"w{rng.randrange(120)}" for _ in range(15))})
        for _ in range(8)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def calibration(text_file: Path, cache: Path, **changes: Any) -> dict[str, Any]:
    settings = {
        "data": str(text_file),
        "samples": SAMPLES,
        "sequence_length": LENGTH,
        "batch_size": 3,
        "cache_dir": str(cache),
    }
    return {**settings, **changes}


def recipe(
    method: str, family: dict[str, Path], text_file: Path, cache: Path, **extra: Any
) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"])}, {"model": str(family["ft2"])}],
        "calibration": calibration(text_file, cache),
        **extra,
    }


def test_txt_is_one_text_and_other_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("w1 w2\nw3\n")
    assert calibration_module.read_texts(CalibrationConfig(data=str(text))) == ["w1 w2\nw3\n"]
    csv = tmp_path / "data.csv"
    csv.write_text("w1")
    with pytest.raises(CalibrationError, match=r"neither \.jsonl, \.txt nor a task file"):
        calibration_module.read_texts(CalibrationConfig(data=str(csv)))


def test_a_task_file_gives_each_example_s_prompt_and_answer() -> None:
    task = Path(__file__).resolve().parents[1] / "src" / "alloykit" / "examples" / "next_word.yml"
    texts = calibration_module.read_texts(CalibrationConfig(data=str(task)))
    rows = [json.loads(line) for line in task.with_suffix(".jsonl").read_text().splitlines()]
    assert len(texts) == len(rows)
    for text in texts:  # the few-shot example, then the prompt and its right choice
        row = next(r for r in rows if text.endswith(r["words"] + " " + r["options"][r["answer"]]))
        assert row is not None


def test_texts_become_blocks_joined_by_eos(text_file: Path, family: dict[str, Path]) -> None:
    _, tokenizer = load_model(Checkpoint(family["base"], "base"))
    settings = CalibrationConfig(data=str(text_file), samples=3, sequence_length=20)
    blocks = token_blocks(settings, calibration_module.read_texts(settings), tokenizer, "base")
    assert blocks.shape == (3, 20)
    first = json.loads(text_file.read_text().splitlines()[0])["text"].split()
    assert blocks[0, :15].tolist() == tokenizer.convert_tokens_to_ids(first)
    assert int(blocks[0, 15]) == tokenizer.eos_token_id


def test_gram_is_the_inputs_transpose_times_inputs(
    family: dict[str, Path], text_file: Path
) -> None:
    model, tokenizer = load_model(Checkpoint(family["ft1"], "ft1"))
    settings = CalibrationConfig(data=str(text_file), samples=SAMPLES, sequence_length=LENGTH)
    blocks = token_blocks(settings, calibration_module.read_texts(settings), tokenizer, "ft1")
    seen: dict[str, list[torch.Tensor]] = {"q": [], "down": []}
    layer = model.model.layers[1]
    layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen["q"].append(a[0]))
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0]))
    totals, axes, aliases = input_statistics(model, blocks, 3, "gram")
    for key, name in (("q", "self_attn.q_proj"), ("down", "mlp.down_proj")):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]]).double().numpy()
        assert x.shape[0] == SAMPLES * LENGTH
        np.testing.assert_allclose(
            totals[f"model.layers.1.{name}.weight"].numpy(), x.T @ x, rtol=1e-9
        )
    # k and v read q's input: one matrix, shared
    assert (
        aliases["model.layers.1.self_attn.k_proj.weight"]
        == "model.layers.1.self_attn.q_proj.weight"
    )
    assert aliases["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert axes["model.layers.1.mlp.down_proj.weight"] == 1


@pytest.mark.parametrize("spec", [ToySpec(tie_word_embeddings=True), ToySpec(model_type="gpt2")])
def test_streamed_statistics_equal_the_whole_model_s(
    spec: ToySpec, tmp_path: Path, text_file: Path
) -> None:
    # one module's weights at a time: tied heads, GPT-2's Conv1D, rotary buffers all still work
    folder = make_family(tmp_path, spec, finetunes=0)["base"]
    checkpoint = Checkpoint(folder, "base")
    model, tokenizer = load_model(checkpoint)
    settings = CalibrationConfig(data=str(text_file), samples=3, sequence_length=LENGTH)
    blocks = token_blocks(settings, calibration_module.read_texts(settings), tokenizer, "b")
    streamed = streamed_model(checkpoint)
    for statistic in ("gram", "activation"):
        whole = input_statistics(model, blocks, 2, statistic)
        parts = input_statistics(streamed, blocks, 2, statistic)
        assert whole[1:] == parts[1:]
        for name, value in whole[0].items():
            torch.testing.assert_close(parts[0][name], value, rtol=1e-6, atol=1e-9)
    assert all(p.is_meta for p in streamed.parameters())  # nothing kept after the pass


def test_regmean_merge_is_the_closed_form_on_every_linear_layer(
    family: dict[str, Path], text_file: Path, cache: Path
) -> None:
    merged = merge_to_state_dict(
        recipe("regmean", family, text_file, cache, parameters={"alpha": 0.8})
    )
    grams = {}
    for label in ("ft1", "ft2"):
        (path,) = cache.glob(f"*{family[label].parent.name}_{label}-gram-*.safetensors")
        grams[label] = load_file(path)
    weights = {label: load_file(family[label] / "model.safetensors") for label in ("ft1", "ft2")}
    for name in (
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "lm_head.weight",
    ):
        gram_name = name.replace("v_proj", "q_proj")
        shrunk = []
        for label in ("ft1", "ft2"):
            g = grams[label][gram_name].double().numpy()
            shrunk.append(0.8 * g + 0.2 * np.diag(np.diag(g)))
        target = sum(
            s @ weights[label][name].double().numpy().T
            for s, label in zip(shrunk, ("ft1", "ft2"), strict=True)
        )
        expected = np.linalg.solve(sum(shrunk), target).T
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-4, atol=1e-6)
    # embeddings and norms have no Gram matrix: the average
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(merged[name], (weights["ft1"][name] + weights["ft2"][name]) / 2)


def test_statistics_are_cached_per_model(
    family: dict[str, Path], text_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = CalibrationConfig(**calibration(text_file, cache))
    first = model_statistics(Checkpoint(family["ft3"], "ft3"), "activation", config)

    def refuse(*args: Any) -> Any:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(calibration_module, "streamed_model", refuse)
    monkeypatch.setattr(calibration_module, "load_model", refuse)
    again = model_statistics(Checkpoint(family["ft3"], "ft3"), "activation", config)
    assert again.path == first.path
    other = CalibrationConfig(**calibration(text_file, cache, samples=3))
    with pytest.raises(AssertionError, match="cache"):
        model_statistics(Checkpoint(family["ft3"], "ft3"), "activation", other)


def test_fisher_merge_weights_by_the_models_fishers(
    family: dict[str, Path], text_file: Path, cache: Path
) -> None:
    merged = merge_to_state_dict(recipe("fisher", family, text_file, cache))
    fishers = {}
    for label in ("ft1", "ft2"):
        (path,) = cache.glob(f"*_{label}-fisher-*.safetensors")
        fishers[label] = load_file(path)
    assert all(bool((f >= 0).all()) for f in fishers["ft1"].values())
    weights = {label: load_file(family[label] / "model.safetensors") for label in ("ft1", "ft2")}
    for name in ("model.layers.2.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):
        f1, f2 = (fishers[label][name].double() + 1e-6 for label in ("ft1", "ft2"))
        expected = (f1 * weights["ft1"][name] + f2 * weights["ft2"][name]) / (f1 + f2)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(
        fishers["ft1"]["model.layers.2.mlp.up_proj.weight"],
        fishers["ft2"]["model.layers.2.mlp.up_proj.weight"],
    )


def test_fisher_of_identical_models_is_their_average(
    family: dict[str, Path], text_file: Path, cache: Path, tmp_path: Path
) -> None:
    twin = shutil.copytree(family["ft1"], tmp_path / "twin")
    config = recipe("fisher", family, text_file, cache)
    config["models"] = [{"model": str(family["ft1"])}, {"model": str(twin)}]
    merged = merge_to_state_dict(config)
    weights = load_file(family["ft1"] / "model.safetensors")
    for name, value in weights.items():
        torch.testing.assert_close(merged[name], value)


def test_aim_with_zero_strength_is_the_method_and_protects_active_inputs(
    family: dict[str, Path], text_file: Path, cache: Path
) -> None:
    models = [
        {"model": str(family[label]), "parameters": {"weight": 1.0, "density": 0.5}}
        for label in ("ft1", "ft2")
    ]
    plain = merge_to_state_dict(
        {"merge_method": "ties", "base_model": str(family["base"]), "models": models}
    )
    zero = merge_to_state_dict(
        recipe("ties", family, text_file, cache, models=models, aim={"strength": 0.0})
    )
    assert plain.keys() == zero.keys()
    for name in plain:
        assert torch.equal(plain[name], zero[name]), name
    strong = merge_to_state_dict(
        recipe("ties", family, text_file, cache, models=models, aim={"strength": 0.6})
    )
    base = load_file(family["base"] / "model.safetensors")
    (path,) = cache.glob("*_base-activation-*.safetensors")
    activation = load_file(path)["model.layers.1.self_attn.q_proj.weight"].double()
    name = "model.layers.1.self_attn.k_proj.weight"  # shares q_proj's input statistic
    relax = 1 - 0.6 * activation / activation.max()
    expected = base[name].double() + (plain[name].double() - base[name].double()) * relax
    torch.testing.assert_close(strong[name].double(), expected, rtol=1e-5, atol=1e-7)
    for untouched in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(strong[untouched], plain[untouched])


def test_aim_on_linear_uses_the_base_among_the_inputs(
    family: dict[str, Path], text_file: Path, cache: Path
) -> None:
    models = [
        {"model": str(family[label]), "parameters": {"weight": 1.0}} for label in ("base", "ft1")
    ]
    config = {"merge_method": "linear", "base_model": str(family["base"]), "models": models}
    plain = merge_to_state_dict(config)
    aimed = merge_to_state_dict(
        {**config, "calibration": calibration(text_file, cache), "aim": {"strength": 1.0}}
    )
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(plain[name], aimed[name])
    base = load_file(family["base"] / "model.safetensors")[name]
    # the most active input channel is fully protected at strength 1
    (path,) = cache.glob("*_base-activation-*.safetensors")
    top = int(load_file(path)[name].argmax())
    torch.testing.assert_close(aimed[name][:, top], base[:, top])


# --------------------------------------------------------------------------- errors


def test_data_aware_methods_need_a_calibration_section(caplog: pytest.LogCaptureFixture) -> None:
    config = {"merge_method": "regmean", "models": [{"model": "a"}, {"model": "b"}]}
    with pytest.raises(ConfigError, match="calibration: regmean needs calibration data"):
        load_config(config)
    with pytest.raises(ConfigError, match="aim: needs a base_model"):
        load_config({**config, "calibration": {"data": "x.jsonl"}, "aim": {"strength": 0.5}})
    with caplog.at_level(logging.WARNING, logger="alloykit"):
        load_config({**config, "merge_method": "linear", "calibration": {"data": "x.jsonl"}})
    assert "calibration: linear uses no calibration data" in caplog.text
    with pytest.raises(ConfigError, match=r"calibration\.samples"):
        load_config({**config, "calibration": {"data": "x.jsonl", "samples": 0}})


def test_missing_and_short_data_are_errors(
    family: dict[str, Path], text_file: Path, cache: Path, tmp_path: Path
) -> None:
    missing = recipe("regmean", family, text_file, cache)
    missing["calibration"]["data"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(
        CalibrationError, match=r"calibration\.data: '.*nope\.jsonl' does not exist"
    ):
        merge_to_state_dict(missing)
    short = recipe("regmean", family, text_file, cache)
    short["calibration"]["samples"] = 100
    with pytest.raises(CalibrationError, match=r"gives \d+ tokens .* fewer than .* = 1200"):
        merge_to_state_dict(short)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "w1 w2"}\n')
    keyless = recipe("regmean", family, text_file, cache)
    keyless["calibration"]["data"] = str(bad)
    with pytest.raises(CalibrationError, match="line 1 has no string field 'text'"):
        merge_to_state_dict(keyless)


def test_a_model_without_config_cannot_run_forward(
    family: dict[str, Path], text_file: Path, cache: Path
) -> None:
    raw = family["ft2"] / "model.safetensors"  # a lone weight file: a state dict, no config
    config = recipe("regmean", family, text_file, cache)
    config["models"][1]["model"] = str(raw)
    with pytest.raises(CalibrationError, match="has no config.json, so it cannot run forward"):
        merge_to_state_dict(config)


def test_fisher_needs_a_language_model_head(
    tmp_path_factory: pytest.TempPathFactory, text_file: Path, cache: Path
) -> None:
    bert = make_family(tmp_path_factory.mktemp("bert"), ToySpec(model_type="bert"), finetunes=2)
    with pytest.raises(
        CalibrationError, match=r"fisher: model '.*ft1' \(BertModel\) has no head that gives logits"
    ):
        merge_to_state_dict(recipe("fisher", bert, text_file, cache))


def test_fisher_of_a_classifier_bias_is_the_mean_squared_score() -> None:
    # for a softmax head, ∂ log p_y / ∂ bias = onehot(y) − p, so F_bias = mean (onehot(y) − p)²
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    blocks = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(1))
    fisher = fisher_statistics(model, blocks, seed=3, label="classifier")
    generator = torch.Generator().manual_seed(3)
    expected = torch.zeros(3)
    with torch.no_grad():
        for block in blocks:
            p = torch.softmax(model(input_ids=block[None]).logits[0], dim=-1)
            y = int(torch.multinomial(p[None], 1, generator=generator))
            expected += (torch.nn.functional.one_hot(torch.tensor(y), 3) - p) ** 2
    torch.testing.assert_close(fisher["classifier.bias"], expected / 5)


def test_fisher_normalize_divides_each_fisher_by_its_whole_model_norm(
    family: dict[str, Path], text_file: Path, cache: Path
) -> None:
    config = recipe("fisher", family, text_file, cache, parameters={"normalize": True})
    merged = merge_to_state_dict(config)
    fishers, weights = {}, {}
    for label in ("ft1", "ft2"):
        (path,) = cache.glob(f"*_{label}-fisher-*.safetensors")
        fishers[label] = load_file(path)
        weights[label] = load_file(family[label] / "model.safetensors")
    norms = {
        label: sum(float(t.double().square().sum()) for t in f.values()) ** 0.5
        for label, f in fishers.items()
    }
    name = "model.layers.1.self_attn.o_proj.weight"
    f1, f2 = (fishers[label][name].double() / norms[label] + 1e-6 for label in ("ft1", "ft2"))
    expected = (f1 * weights["ft1"][name] + f2 * weights["ft2"][name]) / (f1 + f2)
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-7)
