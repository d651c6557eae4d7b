"""The vocabulary rules on their own: output order, row indices, default rows, padding.

Vocabularies here are random subsets of a token pool with random ids (hypothesis), so the
rules are checked on many shapes of disagreement, not only on the toy family's.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.io.tokenizer_files import remap_token_ids
from alloykit.tokenizer import TokenRow, Vocabulary, align_rows, plan_vocabulary

POOL = [f"t{i}" for i in range(24)]


@st.composite
def vocabularies(draw: st.DrawFn) -> dict[str, Vocabulary]:
    """2-4 models; each holds a random subset of POOL, numbered 0.. in a random order."""
    count = draw(st.integers(2, 4))
    result = {}
    for m in range(count):
        tokens = draw(st.lists(st.sampled_from(POOL), min_size=3, max_size=len(POOL), unique=True))
        result[f"m{m}"] = Vocabulary(f"m{m}", {t: i for i, t in enumerate(tokens)}, len(tokens))
    return result


def related(vocabs: dict[str, Vocabulary]) -> dict[str, Vocabulary]:
    """The same vocabularies where every model also holds every token of m0 and m1 (so none is
    unrelated to either possible owner of the output vocabulary), keeping each model's own ids
    first."""
    core = list(vocabs["m0"].by_id())
    core += [t for t in vocabs["m1"].by_id() if t not in core]
    out = {}
    for label, v in vocabs.items():
        tokens = list(v.by_id()) + [t for t in core if t not in v.tokens]
        out[label] = Vocabulary(label, {t: i for i, t in enumerate(tokens)}, len(tokens))
    return out


@settings(max_examples=60, deadline=None)
@given(vocabularies(), st.sampled_from(["union", "base", "m1"]), st.integers(1, 8))
def test_order_indices_and_default_rows(
    vocabs: dict[str, Vocabulary], source: str, multiple: int
) -> None:
    vocabs = related(vocabs)
    plan = plan_vocabulary(
        source=source,
        vocabularies=vocabs,
        base="m0",
        token_rows={},
        pad_to_multiple_of=multiple,
        missing_rows="default_row",
    )
    owner = "m1" if source == "m1" else "m0"
    # the owner's tokens keep their ids; a union appends new tokens model by model, by id
    assert plan.tokens[: len(vocabs[owner].tokens)] == vocabs[owner].by_id()
    if source == "union":
        expected = []
        for label in vocabs:
            expected += [t for t in vocabs[label].by_id() if t not in expected]
        assert plan.tokens == expected
    else:
        assert plan.tokens == vocabs[owner].by_id()
    assert plan.rows % multiple == 0 and 0 <= plan.rows - plan.size < multiple
    # each model's index points at its own row of the token, -1 where it lacks it
    for label, v in vocabs.items():
        assert [v.tokens.get(t, -1) for t in plan.tokens] == plan.index[label].tolist()
    # the default row: the base's, else the single holder's, else every holder's
    sources: dict[int, list[tuple[str, int]]] = {}
    for label, (ids, rows) in plan.contributions.items():
        for i, row in zip(ids.tolist(), rows.tolist(), strict=True):
            sources.setdefault(i, []).append((label, row))
    for i, token in enumerate(plan.tokens):
        holders = [(label, v.tokens[token]) for label, v in vocabs.items() if token in v.tokens]
        if len(holders) == len(vocabs):  # every model has it: no default row is needed
            assert i not in plan.default_ids and i not in sources
            continue
        assert i in plan.default_ids
        expected_sources = [h for h in holders if h[0] == "m0"] or holders
        assert sorted(sources.get(i, [])) == sorted(expected_sources)
        assert plan.counts[i] == len(expected_sources)


@settings(max_examples=40, deadline=None)
@given(vocabularies(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_align_rows_matches_a_float64_reading_of_the_rule(
    vocabs: dict[str, Vocabulary], multiple: int, seed: int
) -> None:
    vocabs = related(vocabs)
    forced_token = vocabs["m0"].by_id()[0]
    configured = {
        forced_token: TokenRow("m1", 0, True),  # force m1's row 0 on everyone
        "new": TokenRow(None, -1, False),  # a token no model has, zeros
    }
    plan = plan_vocabulary(
        source="union",
        vocabularies=vocabs,
        base="m0",
        token_rows=configured,
        pad_to_multiple_of=multiple,
        missing_rows="default_row",
    )
    rng = np.random.default_rng(seed)
    raw = {label: rng.standard_normal((v.rows + 2, 3)) for label, v in vocabs.items()}
    aligned = align_rows(plan, {k: torch.from_numpy(v) for k, v in raw.items()}, torch.float64)
    for label, v in vocabs.items():
        matrix = aligned[label].numpy()
        assert matrix.shape == (plan.rows, 3)
        for i, token in enumerate(plan.tokens):
            holders = [m for m, w in vocabs.items() if token in w.tokens]
            if token == forced_token:
                expected = raw["m1"][0]
            elif token == "new":
                expected = np.zeros(3)
            elif token in v.tokens:
                expected = raw[label][v.tokens[token]]
            elif "m0" in holders:
                expected = raw["m0"][vocabs["m0"].tokens[token]]
            else:
                expected = np.mean([raw[m][vocabs[m].tokens[token]] for m in holders], axis=0)
            np.testing.assert_allclose(matrix[i], expected, rtol=1e-12, atol=1e-12)
        real = matrix[: plan.size].mean(axis=0)
        for row in matrix[plan.size :]:
            np.testing.assert_allclose(row, real, rtol=1e-12, atol=1e-12)
        held = plan.holders(label)
        assert held[: plan.size].tolist() == [
            t in v.tokens and t != forced_token for t in plan.tokens
        ]


def test_token_ids_in_configs_follow_their_tokens() -> None:
    old = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>"}
    new = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    config = {
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "pad_token_id": 9,  # not a token of the donor: left alone
        "text_config": {"eos_token_id": 2},
        "vocab_size": 4,
    }
    moved = remap_token_ids(config, old, new)
    assert moved == {
        "bos_token_id": 2,
        "eos_token_id": [3, 1],
        "pad_token_id": 9,
        "text_config": {"eos_token_id": 3},
        "vocab_size": 4,
    }


def _trained(kind: str, vocab_size: int) -> dict[str, Any]:
    """A tokenizer of model ``kind`` trained on the toy corpus, as a tokenizer.json document."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from alloykit.toymodels import CORPUS

    specials = ["<unk>", "<s>", "</s>"]
    if kind == "Unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer: Any = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    elif kind == "WordPiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    document: dict[str, Any] = json.loads(tokenizer.to_str())
    return document


@pytest.mark.parametrize("kind", ["Unigram", "WordPiece", "WordLevel"])
def test_union_tokenizers_of_each_model_kind_resolve_to_the_aligned_ids(kind: str) -> None:
    from tokenizers import Tokenizer

    from alloykit.io.tokenizer_files import build_document, document_vocabulary
    from alloykit.tokenizer import full_token_map

    small = _trained(kind, 60)
    large = _trained(kind, 90)
    # the large one also has an added special token
    large["added_tokens"].append(
        {
            "id": 0,
            "content": "<|im_start|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    large = json.loads(Tokenizer.from_str(json.dumps(large)).to_str())  # ids assigned
    vocabs = {
        "base": document_vocabulary(small, "base", 10**6),
        "big": document_vocabulary(large, "big", 10**6),
    }
    plan = plan_vocabulary(
        source="union",
        vocabularies=vocabs,
        base="base",
        token_rows={},
        pad_to_multiple_of=None,
        missing_rows="default_row",
    )
    document = build_document(small, plan, "base")
    assert full_token_map(document) == plan.token_ids()
    assert plan.token_ids()["<|im_start|>"] == plan.size - 1
    ours, base = Tokenizer.from_str(json.dumps(document)), Tokenizer.from_str(json.dumps(small))
    text = "the merged model should answer questions"
    if kind in ("WordPiece", "WordLevel"):  # whole-word matches: use words the base has
        text = " ".join(t for t in vocabs["base"].by_id() if t.isalpha())
    assert ours.encode(text).ids == base.encode(text).ids
    assert ours.decode(ours.encode(text).ids) == base.decode(base.encode(text).ids)
    assert ours.encode("<|im_start|>the").ids[0] == plan.size - 1
