"""Merging models whose vocabularies differ: the output vocabulary, its ids, and every row.

The inputs are :func:`alloykit.toymodels.make_vocabulary_family`: real byte-level BPE
tokenizers trained here, one with added chat tokens and merges (``chat``), one with padded rows
(``padded``), one whose last entries have no row (``short``). Each expected row is rebuilt here
from the input files alone, in float64: the row rule (own row, else the base's, else the single
holder's, else the holders' mean, else zeros) is written out again token by token, then the
method is applied to those rows.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from alloykit import merge
from alloykit.errors import CheckpointError, ConfigError, IncompatibleModels
from alloykit.methods import METHODS, MethodInputs
from alloykit.pipeline import MergeOptions, plan_merge
from alloykit.toymodels import CHAT_TOKENS, make_vocabulary_family
from tests.helpers import load_tensors

MODELS = ("base", "chat", "padded", "short")
WEIGHTS = {"base": 0.4, "chat": 0.3, "padded": 0.2, "short": 0.1}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# float32 outputs of float64 arithmetic: one float32 step at the rows' size (|x| < 0.13)
TOL = 1e-8
SAMPLE = "the merged model should follow instructions and write code"


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_vocabulary_family(tmp_path_factory.mktemp("vocab"))


def token_map(folder: Path) -> dict[str, int]:
    """A model's tokens that have a row (id below config.json's vocab_size)."""
    from tokenizers import Tokenizer

    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return {token: i for token, i in ids.items() if i < rows}


def output_map(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    vocab: dict[str, int] = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    return vocab


def union_order(folders: Mapping[str, Path]) -> list[str]:
    """Base tokens by id, then each other model's new tokens by its ids (the documented order)."""
    order: dict[str, None] = {}
    for name in MODELS:
        vocab = token_map(folders[name])
        for token in sorted(vocab, key=vocab.__getitem__):
            order.setdefault(token)
    return list(order)


def aligned_rows(
    folders: Mapping[str, Path],
    tokens: list[str],
    tensor: str,
    configured: Mapping[str, np.ndarray | None] | None = None,
    forced: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each model's rows for ``tokens`` by the row rule, and which rows are its own (float64)."""
    vocab = {name: token_map(folders[name]) for name in MODELS}
    matrices = {}
    for name in MODELS:
        values = load_tensors(folders[name])
        matrices[name] = values.get(tensor, values["model.embed_tokens.weight"])  # tied: embedding
    configured = configured or {}
    aligned = {name: np.zeros((len(tokens), matrices[name].shape[1])) for name in MODELS}
    own = {name: np.zeros(len(tokens), dtype=bool) for name in MODELS}
    for i, token in enumerate(tokens):
        holders = [name for name in MODELS if token in vocab[name]]
        if token in configured:
            row = configured[token]
            default = np.zeros(aligned["base"].shape[1]) if row is None else row
        elif "base" in holders:
            default = matrices["base"][vocab["base"][token]]
        elif holders:
            default = np.mean([matrices[h][vocab[h][token]] for h in holders], axis=0)
        else:
            default = np.zeros(aligned["base"].shape[1])
        for name in MODELS:
            mine = name in holders and token not in forced
            own[name][i] = mine
            aligned[name][i] = matrices[name][vocab[name][token]] if mine else default
    return aligned, own


def merge_folder(tmp_path: Path, name: str, config: dict[str, Any]) -> Path:
    out = tmp_path / name
    merge(config, out, MergeOptions(precision="float64"))
    return out


def linear_config(folders: Mapping[str, Path], **tokenizer: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(folders[n]), "parameters": {"weight": WEIGHTS[n]}} for n in MODELS
        ],
        "tokenizer": tokenizer,
    }


def ties_config(folders: Mapping[str, Path], **tokenizer: Any) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": str(folders["base"]),
        "models": [
            {"model": str(folders[n]), "parameters": {"weight": WEIGHTS[n], "density": 0.6}}
            for n in MODELS[1:]
        ],
        "tokenizer": tokenizer,
    }


# --------------------------------------------------------------------------- union: ids, files


@pytest.fixture(scope="module")
def union_output(vocab_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("union") / "out"
    merge(linear_config(vocab_family, source="union"), out, MergeOptions(precision="float64"))
    return out


def test_union_ids_are_the_documented_order_and_identical_across_runs(
    vocab_family: dict[str, Path], union_output: Path, tmp_path: Path
) -> None:
    expected = union_order(vocab_family)
    assert output_map(union_output) == {token: i for i, token in enumerate(expected)}
    base = token_map(vocab_family["base"])
    assert all(expected[i] == token for token, i in base.items())  # base ids are kept
    assert expected[-2:] == list(CHAT_TOKENS)
    config = json.loads((union_output / "config.json").read_text())
    assert config["vocab_size"] == len(expected)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    again = merge_folder(tmp_path, "again", linear_config(vocab_family, source="union"))
    assert (again / "tokenizer.json").read_bytes() == (union_output / "tokenizer.json").read_bytes()
    assert load_tensors(again).keys() == load_tensors(union_output).keys()


def test_union_tokenizer_encodes_like_the_base_and_the_model_runs_on_new_tokens(
    vocab_family: dict[str, Path], union_output: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(union_output))
    base = AutoTokenizer.from_pretrained(str(vocab_family["base"]))
    ids = ours(SAMPLE)["input_ids"]
    assert ids == base(SAMPLE)["input_ids"]
    assert ours.decode(ids) == base.decode(ids) == SAMPLE
    chat = ours("<|im_start|>user hello<|im_end|>")["input_ids"]
    assert chat[0] == ours.convert_tokens_to_ids(CHAT_TOKENS[0]) == len(ours) - 2
    assert chat[-1] == len(ours) - 1
    model = AutoModelForCausalLM.from_pretrained(str(union_output))
    with torch.no_grad():
        logits = model(torch.tensor([chat])).logits
    assert logits.shape == (1, len(chat), len(ours))
    assert bool(torch.isfinite(logits).all())


# --------------------------------------------------------------------------- the row rule


@pytest.mark.parametrize("missing_rows", ["default_row", "holders_only"])
def test_linear_rows_follow_the_rule_token_by_token(
    vocab_family: dict[str, Path], tmp_path: Path, missing_rows: str
) -> None:
    config = linear_config(vocab_family, source="union", missing_rows=missing_rows)
    out = merge_folder(tmp_path, "out", config)
    tokens = union_order(vocab_family)
    merged = load_tensors(out)
    weights = np.array([WEIGHTS[n] for n in MODELS])
    for tensor in VOCAB_TENSORS:
        aligned, own = aligned_rows(vocab_family, tokens, tensor)
        for i, token in enumerate(tokens):
            rows = np.stack([aligned[n][i] for n in MODELS])
            use = np.ones(len(MODELS), dtype=bool)
            if missing_rows == "holders_only" and any(own[n][i] for n in MODELS):
                use = np.array([own[n][i] for n in MODELS])
            expected = weights[use] @ rows[use] / weights[use].sum()
            np.testing.assert_allclose(merged[tensor][i], expected, rtol=0, atol=TOL, err_msg=token)


def ties_reference(
    plan_config: dict[str, Any],
    aligned: Mapping[str, np.ndarray],
    own: Mapping[str, np.ndarray],
    tensor: str,
    holders_only: bool,
) -> np.ndarray:
    """The ties kernel over the rule's rows (float64); per holder subset for holders_only."""
    job = next(j for j in plan_merge(plan_config).jobs if j.output == tensor)
    method = METHODS["ties"]
    inputs = [n for n in MODELS[1:]]
    stack = torch.from_numpy(np.stack([aligned[n] for n in inputs]))
    base = torch.from_numpy(aligned["base"])
    per_model = {k: torch.tensor(v, dtype=torch.float64) for k, v in job.per_model.items()}

    def run(members: list[int], rows: np.ndarray) -> np.ndarray:
        sub = {k: v[members] for k, v in per_model.items()}
        picked = MethodInputs(stack[members][:, rows].clone(), base[rows], sub, job.params)
        return method.run(picked).numpy()

    everyone = list(range(len(inputs)))
    result = run(everyone, np.arange(stack.shape[1]))
    if holders_only:
        masks = np.stack([own[n] for n in inputs])
        for pattern in {tuple(column) for column in masks.T}:
            members = [j for j, held in enumerate(pattern) if held]
            if members and len(members) < len(inputs):
                rows = np.flatnonzero((pattern == masks.T).all(axis=1))
                result[rows] = run(members, rows)
    return result


@pytest.mark.parametrize("missing_rows", ["default_row", "holders_only"])
def test_ties_rows_follow_the_rule_token_by_token(
    vocab_family: dict[str, Path], tmp_path: Path, missing_rows: str
) -> None:
    config = ties_config(vocab_family, source="union", missing_rows=missing_rows)
    out = merge_folder(tmp_path, "out", config)
    tokens = union_order(vocab_family)
    merged = load_tensors(out)
    for tensor in VOCAB_TENSORS:
        aligned, own = aligned_rows(vocab_family, tokens, tensor)
        expected = ties_reference(config, aligned, own, tensor, missing_rows == "holders_only")
        for i, token in enumerate(tokens):
            np.testing.assert_allclose(
                merged[tensor][i], expected[i], rtol=0, atol=TOL, err_msg=token
            )
    if missing_rows == "holders_only":  # a token only chat has keeps chat's row
        i = tokens.index(CHAT_TOKENS[0])
        np.testing.assert_allclose(
            merged["lm_head.weight"][i], aligned["chat"][i], rtol=0, atol=TOL
        )


def test_tokens_entries_give_their_rows_bit_for_bit(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    chat_only = [t for t in union_order(vocab_family) if t not in token_map(vocab_family["base"])]
    shared_new = chat_only[0]  # chat and padded have it, the base does not
    tokens_config = {
        CHAT_TOKENS[0]: {
            "source": {"kind": "model_token", "model": str(vocab_family["base"]), "token": "<s>"},
            "force": True,
        },
        CHAT_TOKENS[1]: {"source": {"kind": "zero"}, "force": True},
        "<tool>": {
            "source": {"kind": "model_token", "model": str(vocab_family["chat"]), "token_id": 5}
        },
        shared_new: {"source": str(vocab_family["padded"])},
    }
    config = linear_config(vocab_family, source="union", tokens=tokens_config)
    out = merge_folder(tmp_path, "out", config)
    ids = output_map(out)
    tokens = [*union_order(vocab_family), "<tool>"]
    assert ids == {token: i for i, token in enumerate(tokens)}
    merged = load_tensors(out)
    for tensor in VOCAB_TENSORS:
        base_rows = load_tensors(vocab_family["base"])[tensor]
        chat_rows = load_tensors(vocab_family["chat"])[tensor]
        padded_rows = load_tensors(vocab_family["padded"])[tensor]
        padded_id = token_map(vocab_family["padded"])[shared_new]
        row = merged[tensor]
        assert np.array_equal(row[ids[CHAT_TOKENS[0]]], base_rows[1])
        assert np.array_equal(row[ids[CHAT_TOKENS[1]]], np.zeros(row.shape[1]))
        assert np.array_equal(row[ids["<tool>"]], chat_rows[5])
        configured = {
            CHAT_TOKENS[0]: base_rows[1],
            CHAT_TOKENS[1]: None,
            "<tool>": chat_rows[5],
            shared_new: padded_rows[padded_id],
        }
        aligned, _ = aligned_rows(vocab_family, tokens, tensor, configured, frozenset(CHAT_TOKENS))
        weights = np.array([WEIGHTS[n] for n in MODELS])
        expected = np.einsum("m,mvh->vh", weights, np.stack([aligned[n] for n in MODELS]))
        np.testing.assert_allclose(row, expected / weights.sum(), rtol=0, atol=TOL)


# --------------------------------------------------------------------------- other sources


def test_base_source_keeps_the_base_vocabulary(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    out = merge_folder(tmp_path, "out", linear_config(vocab_family, source="base"))
    base = token_map(vocab_family["base"])
    assert output_map(out) == base
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(base)
    tokens = sorted(base, key=base.__getitem__)
    aligned, _ = aligned_rows(vocab_family, tokens, "lm_head.weight")
    weights = np.array([WEIGHTS[n] for n in MODELS])
    expected = np.einsum("m,mvh->vh", weights, np.stack([aligned[n] for n in MODELS]))
    np.testing.assert_allclose(load_tensors(out)["lm_head.weight"], expected, rtol=0, atol=TOL)


def test_model_source_takes_that_models_tokenizer_and_chat_template(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    config = ties_config(vocab_family)
    del config["tokenizer"]
    config["tokenizer_source"] = str(vocab_family["chat"])
    out = merge_folder(tmp_path, "out", config)
    assert output_map(out) == token_map(vocab_family["chat"])
    assert (out / "chat_template.jinja").read_text() == (
        vocab_family["chat"] / "chat_template.jinja"
    ).read_text()
    assert load_tensors(out)["model.embed_tokens.weight"].shape[0] == len(output_map(out))


def test_padding_rows_are_the_mean_of_the_real_rows(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    config = linear_config(vocab_family, source="union", pad_to_multiple_of=32)
    out = merge_folder(tmp_path, "out", config)
    size = len(union_order(vocab_family))
    padded = -(-size // 32) * 32
    assert len(output_map(out)) == size
    assert json.loads((out / "config.json").read_text())["vocab_size"] == padded
    for tensor in VOCAB_TENSORS:
        rows = load_tensors(out)[tensor]
        assert rows.shape[0] == padded
        # linear is linear: the merged padding rows are the mean of the merged real rows
        np.testing.assert_allclose(
            rows[size:], np.broadcast_to(rows[:size].mean(0), rows[size:].shape), atol=1e-8
        )
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model(torch.tensor([[0, size - 1]])).logits.shape == (1, 2, padded)


def test_tied_embeddings_stay_tied(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    folders = make_vocabulary_family(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)
    out = merge_folder(tmp_path, "out", linear_config(folders, source="union"))
    merged = load_tensors(out)
    config = json.loads((out / "config.json").read_text())
    assert "lm_head.weight" not in merged and config["tie_word_embeddings"] is True
    tokens = union_order(folders)
    assert config["vocab_size"] == len(tokens) == merged["model.embed_tokens.weight"].shape[0]
    aligned, _ = aligned_rows(folders, tokens, "model.embed_tokens.weight")
    weights = np.array([WEIGHTS[n] for n in MODELS])
    expected = np.einsum("m,mvh->vh", weights, np.stack([aligned[n] for n in MODELS]))
    np.testing.assert_allclose(merged["model.embed_tokens.weight"], expected, rtol=0, atol=TOL)


# --------------------------------------------------------------------------- chat templates


def test_chat_template_auto_takes_the_most_common_one(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    config = linear_config(vocab_family, source="union")
    config["chat_template"] = "auto"
    out = merge_folder(tmp_path, "out", config)
    expected = (vocab_family["chat"] / "chat_template.jinja").read_text()
    assert (out / "chat_template.jinja").read_text() == expected


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_builtin_chat_templates_render(name: str) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from alloykit.chat_templates import CHAT_TEMPLATES

    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"},
    ]
    template = ImmutableSandboxedEnvironment().from_string(CHAT_TEMPLATES[name])
    text = template.render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    positions = [text.index(m["content"]) for m in messages]
    assert positions == sorted(positions), text


def test_a_set_template_replaces_every_stale_copy(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    # a base whose template sits in tokenizer_config.json and chat_template.json
    import shutil

    from transformers import AutoTokenizer

    from alloykit.chat_templates import CHAT_TEMPLATES

    base = tmp_path / "base"
    shutil.copytree(vocab_family["base"], base)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{{ 'stale' }}"
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'stale' }}"}))
    folders = dict(vocab_family, base=base)
    for source in ("union", None):  # a built tokenizer, and the base's copied one
        config = linear_config(folders, source=source or "union")
        if source is None:  # models of one vocabulary: the base's tokenizer files are copied
            del config["tokenizer"]
            config["models"] = config["models"][:1]
        config["chat_template"] = "llama3"
        out = merge_folder(tmp_path, f"out-{source}", config)
        assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES["llama3"]
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
        assert not (out / "chat_template.json").exists()
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"


def test_literal_chat_template(vocab_family: dict[str, Path], tmp_path: Path) -> None:
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    config = linear_config(vocab_family, source="base")
    config["chat_template"] = literal
    out = merge_folder(tmp_path, "out", config)
    assert (out / "chat_template.jinja").read_text() == literal


# --------------------------------------------------------------------------- errors


def test_a_model_without_tokenizer_files_is_named(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(vocab_family["short"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    config = linear_config(dict(vocab_family, short=bare), source="union")
    with pytest.raises(CheckpointError, match=rf"model '{bare}' has no tokenizer files"):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unrelated_vocabularies_are_refused(vocab_family: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from alloykit.toymodels import _write_tokenizer

    other = tmp_path / "other"
    shutil.copytree(vocab_family["short"], other)
    (other / "tokenizer.json").unlink()
    _write_tokenizer(other, json.loads((other / "config.json").read_text())["vocab_size"])
    for source in ("base", "union"):
        config = linear_config(dict(vocab_family, short=other), source=source)
        with pytest.raises(IncompatibleModels, match=rf"model '{other}' shares only \d+ of its"):
            merge(config, tmp_path / "out")
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ({"source": "nowhere"}, "tokenizer.source: 'nowhere' is not base, union or one of"),
        ({"missing_rows": "some"}, "tokenizer.missing_rows: 'some' is not one of"),
        ({"tokens": {"x": {"source": "base", "oops": 1}}}, "tokenizer.tokens.x: expected"),
    ],
)
def test_bad_tokenizer_settings_are_config_errors(
    vocab_family: dict[str, Path], tokenizer: dict[str, Any], message: str
) -> None:
    from alloykit.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(linear_config(vocab_family, **tokenizer))


def test_tokens_entries_that_name_no_row_are_config_errors(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    base, chat = str(vocab_family["base"]), str(vocab_family["chat"])
    tokens = {
        CHAT_TOKENS[0]: {"source": base},  # the base has no such token
        "<a>": {"source": {"kind": "model_token", "model": chat, "token_id": 10**6}},
        "<b>": {"source": {"kind": "zero"}, "force": "yes"},
        "<c>": {"force": True},
    }
    with pytest.raises(ConfigError) as caught:
        merge(linear_config(vocab_family, tokens=tokens), tmp_path / "out")
    text = str(caught.value)
    assert f"model '{base}' has no token '{CHAT_TOKENS[0]}'" in text
    assert "token_id: 1000000 is not a row of model" in text
    assert "tokenizer.tokens.<c>: force needs a source" in text
    assert not (tmp_path / "out").exists()


def test_an_in_memory_stage_passes_its_tokenizer_on(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    """A stage that builds a union vocabulary, merged again with the base (whose vocabulary
    is smaller) in a final stage with tokenizer_source: union."""
    import yaml

    first = dict(linear_config(vocab_family, source="union"), name="first")
    final = {
        "merge_method": "linear",
        "models": [
            {"model": "first", "parameters": {"weight": 1.0}},
            {"model": str(vocab_family["base"]), "parameters": {"weight": 1.0}},
        ],
        "tokenizer_source": "union",
    }
    text = yaml.safe_dump(first) + "---\n" + yaml.safe_dump(final)
    out = tmp_path / "out"
    merge(text, out, MergeOptions(precision="float64"))
    tokens = union_order(vocab_family)
    assert output_map(out) == {token: i for i, token in enumerate(tokens)}
    # the base lacks chat's tokens: their rows are the first stage's (its single holder)
    stage = merge_folder(tmp_path, "stage", linear_config(vocab_family, source="union"))
    base = load_tensors(vocab_family["base"])["lm_head.weight"]
    merged, first_rows = load_tensors(out)["lm_head.weight"], load_tensors(stage)["lm_head.weight"]
    np.testing.assert_allclose(merged[len(base) :], first_rows[len(base) :], atol=TOL)
    np.testing.assert_allclose(merged[: len(base)], (first_rows[: len(base)] + base) / 2, atol=TOL)
    assert not list(Path(tempfile.gettempdir()).glob("alloykit-stage-first-*"))


def test_dry_run_describes_the_vocabulary(vocab_family: dict[str, Path]) -> None:
    from alloykit._output import describe_vocabulary

    plan = plan_merge(linear_config(vocab_family, source="union", pad_to_multiple_of=64))
    size = len(union_order(vocab_family))
    assert describe_vocabulary(plan) == (
        f"vocabulary: union, {size} tokens, 128 rows (tokenizer from m0; m0 lacks 8, m1 lacks 0, "
        "m2 lacks 2, m3 lacks 11; missing rows: default_row)"
    )
    embedding = next(j for j in plan.jobs if j.output == "model.embed_tokens.weight")
    assert embedding.vocabulary and embedding.shape == (128, 16)


def test_kept_embeddings_are_the_base_rows_aligned(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    """keep_from_base with a union: the base's rows, and default rows for tokens it lacks."""
    config = ties_config(vocab_family, source="union")
    config["keep_from_base"] = ["embedding", "head"]
    out = merge_folder(tmp_path, "out", config)
    tokens = union_order(vocab_family)
    merged = load_tensors(out)
    for tensor in VOCAB_TENSORS:
        aligned, _ = aligned_rows(vocab_family, tokens, tensor)
        np.testing.assert_array_equal(merged[tensor], aligned["base"].astype(np.float32))


def test_vocab_size_is_set_in_nested_text_configs() -> None:
    from alloykit.plan import _tokenizer_config
    from alloykit.tokenizer import OutputTokenizer, Vocabulary, plan_vocabulary

    vocabs = {"a": Vocabulary("a", {"x": 0, "y": 1}, 2), "b": Vocabulary("b", {"y": 0, "z": 1}, 2)}
    plan = plan_vocabulary(
        source="union",
        vocabularies=vocabs,
        base="a",
        token_rows={},
        pad_to_multiple_of=4,
        missing_rows="default_row",
    )
    tokenizer = OutputTokenizer(plan, None, "a", None, {"a": {"x": 0, "y": 1}})
    config = {"text_config": {"vocab_size": 2, "eos_token_id": 1}, "vision_config": {}}
    assert _tokenizer_config(config, tokenizer, "a") == {
        "text_config": {"vocab_size": 4, "eos_token_id": 1},
        "vision_config": {},
    }


def test_special_token_ids_follow_the_output_tokenizer(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    """A tokenizer source numbering <s> and </s> the other way round moves the donor's ids."""
    import shutil

    swapped = tmp_path / "swapped"
    shutil.copytree(vocab_family["base"], swapped)
    document = json.loads((swapped / "tokenizer.json").read_text())
    ids = {"<s>": 2, "</s>": 1}
    document["model"]["vocab"].update(ids)
    for entry in document["added_tokens"]:
        entry["id"] = ids.get(entry["content"], entry["id"])
    (swapped / "tokenizer.json").write_text(json.dumps(document))
    config = ties_config(dict(vocab_family, short=swapped))
    del config["tokenizer"]
    config["tokenizer_source"] = str(swapped)
    out = merge_folder(tmp_path, "out", config)
    tokens = output_map(out)
    assert (tokens["<s>"], tokens["</s>"]) == (2, 1)
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((out / name).read_text())
        assert (settings["bos_token_id"], settings["eos_token_id"]) == (2, 1), name
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(out))
    assert (loaded.bos_token_id, loaded.eos_token_id) == (2, 1)


def test_a_configured_token_outside_the_base_vocabulary_is_an_added_token(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    """source: base with a tokens: entry for chat's <|im_start|>: it joins the base's vocabulary
    as chat's special token, with chat's row, and is matched in text."""
    from transformers import AutoTokenizer

    tokens = {CHAT_TOKENS[0]: {"source": str(vocab_family["chat"])}}
    out = merge_folder(tmp_path, "out", linear_config(vocab_family, source="base", tokens=tokens))
    base = token_map(vocab_family["base"])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.get_vocab() == {**base, CHAT_TOKENS[0]: len(base)}
    assert tokenizer(CHAT_TOKENS[0] + "the")["input_ids"][0] == len(base)
    chat = token_map(vocab_family["chat"])
    row = load_tensors(vocab_family["chat"])["lm_head.weight"][chat[CHAT_TOKENS[0]]]
    np.testing.assert_allclose(load_tensors(out)["lm_head.weight"][len(base)], row, atol=TOL)


def test_modules_align_the_embeddings_and_an_unmoduled_head(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    """modules: {model: ...} merges the embeddings (aligned) and copies lm_head, aligned."""
    config = linear_config(vocab_family, source="union")
    config["modules"] = {"model": {"models": config.pop("models")}}
    out = merge_folder(tmp_path, "out", config)
    tokens = union_order(vocab_family)
    merged = load_tensors(out)
    aligned, _ = aligned_rows(vocab_family, tokens, "model.embed_tokens.weight")
    weights = np.array([WEIGHTS[n] for n in MODELS])
    expected = np.einsum("m,mvh->vh", weights, np.stack([aligned[n] for n in MODELS]))
    np.testing.assert_allclose(
        merged["model.embed_tokens.weight"], expected / weights.sum(), atol=TOL
    )
    head, _ = aligned_rows(vocab_family, tokens, "lm_head.weight")
    np.testing.assert_allclose(merged["lm_head.weight"], head["base"], atol=TOL)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tokens)


def test_differing_vocabularies_without_a_tokenizer_setting_name_the_fix(
    vocab_family: dict[str, Path],
) -> None:
    """No tokenizer_source: the shape error says the vocabularies differ and what to set."""
    config = {
        "merge_method": "ties",
        "base_model": str(vocab_family["base"]),
        "models": [{"model": str(vocab_family["chat"]), "parameters": {"density": 0.6}}],
    }
    with pytest.raises(IncompatibleModels, match=r"vocabularies differ: set tokenizer_source"):
        plan_merge(config)
