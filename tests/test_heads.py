"""Backbones and heads: a BertModel base merged with BertForSequenceClassification fine-tunes.

The fine-tunes store the backbone under ``bert.`` and a classifier of their own (2 and 3
labels); the merge matches tensors across the prefix, leaves the classifiers out or copies
them from ``heads.source``, and the output loads in transformers with no missing keys.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from alloykit import merge, merge_to_state_dict, plan_merge
from alloykit.architecture import architecture_family, backbone_prefix
from alloykit.errors import ConfigError, IncompatibleModels
from tests.helpers import load_tensors, run_cli, write_yaml

PREFIX = "bert."
WEIGHTS = {"base": 1.0, "ft1": 2.0, "ft2": 3.0}


def _bert_config(num_labels: int = 2):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random BertModel base and two classifier fine-tunes of it (2 and 3 labels)."""
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = BertModel(_bert_config())
    base.save_pretrained(root / "base")
    folders = {"base": root / "base"}
    for index, num_labels in ((1, 2), (2, 3)):
        finetune = BertForSequenceClassification(_bert_config(num_labels))
        finetune.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in finetune.bert.parameters():
                parameter.add_(0.01 * index * torch.randn_like(parameter))
        finetune.save_pretrained(root / f"ft{index}")
        folders[f"ft{index}"] = root / f"ft{index}"
    return folders


def _config(bert: dict[str, Path], method: str = "linear", **extra: object) -> dict[str, object]:
    config: dict[str, object] = {
        "merge_method": method,
        "base_model": str(bert["base"]),
        "models": [
            {"model": str(bert[k]), "parameters": {"weight": WEIGHTS[k]}}
            for k in ("base", "ft1", "ft2")
        ],
        **extra,
    }
    if method == "task_arithmetic":
        config["models"] = [
            {"model": str(bert[k]), "parameters": {"weight": WEIGHTS[k]}} for k in ("ft1", "ft2")
        ]
    return config


def _reference(bert: dict[str, Path], method: str) -> dict[str, np.ndarray]:
    """The merge of the backbone tensors in NumPy float64, in the base's naming."""
    base = load_tensors(bert["base"])
    finetunes = {k: load_tensors(bert[k]) for k in ("ft1", "ft2")}
    expected = {}
    for name, value in base.items():
        others = {k: tensors[PREFIX + name] for k, tensors in finetunes.items()}
        if method == "linear":
            total = WEIGHTS["base"] * value + sum(WEIGHTS[k] * v for k, v in others.items())
            expected[name] = total / sum(WEIGHTS.values())
        else:  # task_arithmetic, lambda 1
            expected[name] = value + sum(WEIGHTS[k] * (v - value) for k, v in others.items())
    return expected


def _assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(
            actual[name], value, rtol=0, atol=1e-6 * max(1, np.abs(value).max()), err_msg=name
        )


def _assert_no_key_problems(info: dict[str, object]) -> None:
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_backbone_merge_loads_as_bert_model(
    bert: dict[str, Path], tmp_path: Path, method: str
) -> None:
    from transformers import BertModel

    result = merge(_config(bert, method), tmp_path / "out")
    _, info = BertModel.from_pretrained(str(result.output), output_loading_info=True)
    _assert_no_key_problems(info)
    _assert_close(load_tensors(result.output), _reference(bert, method))


def test_heads_left_out_with_one_warning(bert: dict[str, Path], tmp_path: Path) -> None:
    result = merge(_config(bert), tmp_path / "out")
    assert not any(name.startswith("classifier") for name in load_tensors(result.output))
    notes = [w for w in result.warnings if "classifier" in w]
    assert len(notes) == 1
    assert "'classifier.weight'" in notes[0] and "'classifier.bias'" in notes[0]
    assert "heads: {source: MODEL}" in notes[0]
    assert not any("not in the output" in w for w in result.warnings)  # all else matched


def test_heads_source_copies_its_classifier_and_config(
    bert: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import BertForSequenceClassification

    config = _config(bert, heads={"source": str(bert["ft2"])})
    result = merge(config, tmp_path / "out")
    model, info = BertForSequenceClassification.from_pretrained(
        str(result.output), output_loading_info=True
    )
    _assert_no_key_problems(info)
    assert model.config.num_labels == 3
    assert result.plan.donor == str(bert["ft2"])
    written = load_file(result.output / "model.safetensors")
    original = load_file(bert["ft2"] / "model.safetensors")
    for name in ("classifier.weight", "classifier.bias"):
        assert written[name].dtype == original[name].dtype
        assert written[name].tobytes() == original[name].tobytes()  # bit for bit
    backbone = {
        name.removeprefix(PREFIX): value
        for name, value in load_tensors(result.output).items()
        if name.startswith(PREFIX)
    }
    _assert_close(backbone, _reference(bert, "linear"))
    assert not any("classifier" in w for w in result.warnings)


def test_heads_source_without_heads_leaves_them_out(bert: dict[str, Path]) -> None:
    plan = plan_merge(_config(bert, heads={"source": str(bert["base"])}))
    assert not any(job.output.startswith("classifier") for job in plan.jobs)
    assert any("does not have them" in w and "'classifier.weight'" in w for w in plan.warnings)


def test_bad_heads_source_is_a_one_line_config_error(bert: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as error:
        plan_merge(_config(bert, heads={"source": str(bert["ft2"]) + "x"}))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("heads.source: ") and "is not one of the config's models" in message
    assert f"did you mean '{bert['ft2']}'" in message
    with pytest.raises(ConfigError, match=r"heads\.sources: unknown key \(did you mean 'source'"):
        plan_merge(_config(bert, heads={"sources": str(bert["ft2"])}))


def test_integer_buffers_come_from_the_base(bert: dict[str, Path], tmp_path: Path) -> None:
    folders = {}
    for label, folder in bert.items():
        copy = tmp_path / label
        shutil.copytree(folder, copy)
        tensors = load_file(copy / "model.safetensors")
        prefix = "" if label == "base" else PREFIX
        # every fine-tune's buffer differs from the base's: averaging would show
        offset = 0 if label == "base" else 7 * int(label[-1])
        tensors[prefix + "embeddings.position_ids"] = np.arange(32, dtype=np.int64)[None] + offset
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        folders[label] = copy
    state = merge_to_state_dict(_config(folders))
    buffer = state["embeddings.position_ids"]
    assert buffer.dtype == torch.int64
    assert torch.equal(buffer, torch.arange(32)[None])


def _with_buffer(
    bert: dict[str, Path], tmp_path: Path, name: str, dtype: type = np.int64
) -> dict[str, Path]:
    """The family with tensor ``name`` added to the base only (as an older save holds it)."""
    folders = dict(bert)
    copy = tmp_path / "base"
    shutil.copytree(bert["base"], copy)
    tensors = load_file(copy / "model.safetensors")
    tensors[name] = np.arange(32, dtype=dtype)[None]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    folders["base"] = copy
    return folders


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_a_buffer_only_the_base_holds_is_copied_with_a_warning(
    bert: dict[str, Path], tmp_path: Path, method: str
) -> None:
    # all-MiniLM-L6-v2's file holds embeddings.position_ids; fine-tunes saved by
    # transformers 5 do not (a non-persistent buffer)
    folders = _with_buffer(bert, tmp_path, "embeddings.position_ids")
    result = merge(_config(folders, method), tmp_path / "out")
    state = load_tensors(result.output)
    np.testing.assert_array_equal(state.pop("embeddings.position_ids"), np.arange(32)[None])
    _assert_close(state, _reference(bert, method))  # every weight merged as without it
    notes = [w for w in result.warnings if "position_ids" in w]
    assert len(notes) == 1 and "copied from model" in notes[0]
    assert str(bert["ft1"]) in notes[0] and str(bert["ft2"]) in notes[0]


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("embeddings.rotary_ids", np.int64),  # not a known buffer name
        ("embeddings.position_ids", np.float32),  # a float tensor is a weight
    ],
)
def test_other_tensors_only_the_base_holds_are_still_refused(
    bert: dict[str, Path], tmp_path: Path, name: str, dtype: type
) -> None:
    folders = _with_buffer(bert, tmp_path, name, dtype)
    with pytest.raises(IncompatibleModels, match=f"tensor 'bert.{name}' is missing from model"):
        plan_merge(_config(folders))


def test_a_model_without_config_json_is_matched_too(bert: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(bert["ft1"], tmp_path / "ft1")
    (tmp_path / "ft1" / "config.json").unlink()
    folders = {**bert, "ft1": tmp_path / "ft1"}
    state = merge_to_state_dict(_config(folders))
    _assert_close(
        {name: value.double().numpy() for name, value in state.items()},
        _reference(bert, "linear"),
    )


def test_cli_merges_backbone_and_heads(bert: dict[str, Path], tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    recipe = write_yaml(
        tmp_path / "merge.yml",
        f"""merge_method: ties
base_model: {bert["base"]}
models:
  - model: {bert["ft1"]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {bert["ft2"]}
    parameters: {{weight: 1.0, density: 0.5}}
heads: {{source: {bert["ft1"]}}}
""",
    )
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    model, info = BertForSequenceClassification.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True
    )
    _assert_no_key_problems(info)
    assert model.config.num_labels == 2
    rerun = run_cli("merge", tmp_path / "out" / "alloykit_config.yml", tmp_path / "again")
    assert rerun.returncode == 0, rerun.stderr  # the written recipe names heads.source too
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == (
        load_file(tmp_path / "out" / "model.safetensors").keys()
    )


def test_backbone_rule() -> None:
    assert architecture_family("BertForSequenceClassification") == "Bert"
    assert architecture_family("BertModel") == "Bert"
    assert architecture_family("LlamaForCausalLM") != architecture_family("MistralForCausalLM")
    config = {"model_type": "bert"}
    assert backbone_prefix(config, ["bert.encoder.layer.0.output.dense.weight"]) == "bert."
    assert backbone_prefix(config, ["encoder.layer.0.output.dense.weight"]) == ""
    assert backbone_prefix(None, ["bert.encoder.layer.0.output.dense.weight"]) == ""
