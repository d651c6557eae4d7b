"""Scores of tiny models with known answers, checked against hand computations from logits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit.evaluation import EvalOptions, evaluate
from alloykit.evaluation.runner import rolling_windows
from tests.evaluation.fixtures import VOCAB, constant_model, token, write_jsonl, write_task


@pytest.fixture(scope="module")
def emits_w7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose greedy output is always w7."""
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[token("w7")] = 5.0
    return constant_model(tmp_path_factory.mktemp("w7") / "model", logits)


@pytest.fixture(scope="module")
def fixed_logits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A model with the same seeded random logits at every position."""
    logits = np.random.default_rng(3).standard_normal(VOCAB).astype(np.float32) * 2
    return constant_model(tmp_path_factory.mktemp("fixed") / "model", logits), logits


def test_a_model_that_always_emits_w7_gets_the_expected_exact_match(
    tmp_path: Path, emits_w7: Path
) -> None:
    rows = [{"q": "w1 w2", "a": "w7"}, {"q": "w3", "a": "W7"}, {"q": "w4", "a": "w8"}]
    write_jsonl(tmp_path / "data.jsonl", rows)
    write_task(
        tmp_path / "plain.yml",
        "data: data.jsonl\nprompt: 'Q: {{ q }} A:'\ntarget: a\nmetric: exact_match\n"
        "generation: {max_new_tokens: 3, stop: [' ']}\n",
    )
    # three w7 tokens decode to "w7 w7 w7"; the stop string " " leaves "w7"
    assert evaluate(emits_w7, tmp_path / "plain.yml")["plain"] == pytest.approx(1 / 3)
    write_task(
        tmp_path / "cased.yml",
        "data: data.jsonl\nprompt: '{{ q }}'\ntarget: a\ngeneration: {max_new_tokens: 2, stop: []}\n"
        "metric: {kind: exact_match, extract: '(w\\d+)$', extract_match: last,"
        " normalize: {ignore_case: true}}\n",
    )
    assert evaluate(emits_w7, tmp_path / "cased.yml")["cased"] == pytest.approx(2 / 3)


def test_multiple_choice_equals_log_softmax_sums(
    tmp_path: Path, fixed_logits: tuple[Path, np.ndarray]
) -> None:
    folder, logits = fixed_logits
    log_p = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy()
    rows = [
        {"q": "w1", "options": ["w5", "w6 w9", "w10"], "answer": 0},
        {"q": "w2 w3", "options": ["w11 w12 w13", "w14"], "answer": "w14"},
        {"q": "w4", "options": ["w20", "w21"], "answer": "B"},
    ]
    write_jsonl(tmp_path / "mc.jsonl", rows)
    write_task(
        tmp_path / "mc.yml",
        "data: mc.jsonl\nprompt: '{{ q }}'\nchoices: options\ntarget: answer\n"
        "metric: multiple_choice\n",
    )
    labels = [0, 1, 1]
    right = right_norm = 0
    for row, label in zip(rows, labels, strict=True):
        scores = [sum(log_p[token(w)] for w in choice.split()) for choice in row["options"]]
        right += int(np.argmax(scores)) == label
        per_byte = [
            s / len((" " + c).encode()) for s, c in zip(scores, row["options"], strict=True)
        ]
        right_norm += int(np.argmax(per_byte)) == label
    result = evaluate(folder, tmp_path / "mc.yml", EvalOptions(batch_size=2)).tasks["mc"]
    assert result.scores == pytest.approx({"acc": right / 3, "acc_norm": right_norm / 3})
    assert result.n == 3 and result.primary == "acc"


def test_loglikelihoods_of_a_random_model_match_unbatched_forward_passes(
    family: dict[str, Path],
) -> None:
    """Padding-aware batches give each request the log-likelihood of its own forward pass."""
    from transformers import AutoModelForCausalLM

    from alloykit.evaluation.model import resolve_source
    from alloykit.evaluation.runner import loglikelihoods
    from alloykit.evaluation.score import EvalOptions, skeleton_for

    skeleton = skeleton_for(resolve_source(str(family["ft1"])), EvalOptions())
    requests = [([1, 5, 6, 7, 8], [9, 10]), ([1, 4], [11]), ([1, 3, 3], [12, 13, 14, 15])]
    got = loglikelihoods(
        skeleton.model, requests, pad_id=0, max_length=64, batching=skeleton.batching(3)
    )
    reference = AutoModelForCausalLM.from_pretrained(family["ft1"]).eval()
    for (context, continuation), (value, _) in zip(requests, got, strict=True):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            log_p = torch.log_softmax(reference(ids).logits[0].double(), -1)
        expected = sum(log_p[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
        assert value == pytest.approx(expected, abs=1e-4)


def test_perplexity_is_exp_of_the_mean_token_loss(tmp_path: Path, family: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    docs = ["w1 w2 w3 w4 w5", "w9 w8", "w20 w21 w22 w23 w24 w25 w26 w27 w28 w3 w4"]
    write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    write_task(tmp_path / "ppl.yml", "data: text.jsonl\nprompt: '{{ text }}'\nmetric: perplexity\n")
    model = AutoModelForCausalLM.from_pretrained(family["base"]).eval()
    total_loss, total_tokens = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[1] + [token(w) for w in doc.split()]])  # BOS, then the words
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        total_loss += torch.nn.functional.cross_entropy(
            logits[:-1], ids[0, 1:], reduction="sum"
        ).item()
        total_tokens += ids.shape[1] - 1
    result = evaluate(family["base"], tmp_path / "ppl.yml").tasks["ppl"]
    assert result.value == pytest.approx(math.exp(total_loss / total_tokens), rel=1e-5)
    nbytes = sum(len(d.encode()) for d in docs)
    assert result.scores["bits_per_byte"] == pytest.approx(
        total_loss / (math.log(2) * nbytes), rel=1e-5
    )
    # windows shorter than the documents still score every token exactly once
    short = evaluate(family["base"], tmp_path / "ppl.yml", EvalOptions(max_length=4))
    assert short.tasks["ppl"].scores["tokens"] == total_tokens


def test_rolling_windows_score_every_token_once_with_bounded_input() -> None:
    tokens = list(range(10, 23))
    windows = rolling_windows(tokens, 1, 4)
    scored = [t for _, continuation in windows for t in continuation]
    assert scored == tokens
    assert all(len(c) + len(x) - 1 <= 4 for c, x in windows)
    assert windows[0] == ([1], tokens[:4])


def test_batched_generation_equals_one_at_a_time(family: dict[str, Path]) -> None:
    """Left padding leaves each prompt's greedy continuation unchanged."""
    from alloykit.evaluation.model import resolve_source
    from alloykit.evaluation.runner import generate
    from alloykit.evaluation.score import skeleton_for

    skeleton = skeleton_for(resolve_source(str(family["ft2"])), EvalOptions())
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]

    def run(size: int) -> list[str]:
        return generate(
            skeleton.model,
            skeleton.tokenizer,
            prompts,
            max_new_tokens=4,
            stop=[],
            pad_id=skeleton.pad_id,
            max_length=64,
            batching=skeleton.batching(size),
        )

    together, alone = run(3), run(1)
    assert together == alone and all(len(text.split()) >= 1 for text in alone)


def test_automatic_batch_size_halves_on_out_of_memory() -> None:
    from alloykit.evaluation.runner import Batching

    seen: list[int] = []

    def fn(batch: list[int]) -> list[int]:
        seen.append(len(batch))
        if len(batch) > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        return [x * 2 for x in batch]

    batching = Batching(None, torch.device("cpu"))
    assert batching.run(list(range(10)), lambda x: x, fn) == [x * 2 for x in range(10)]
    assert seen[:3] == [10, 8, 4] and batching.learned == 4
    with pytest.raises(RuntimeError, match="out of memory"):
        Batching(8, torch.device("cpu")).run(list(range(10)), lambda x: x, fn)


def test_chat_tasks_use_the_tokenizers_chat_template(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    from alloykit.evaluation.model import resolve_source
    from alloykit.evaluation.score import _chat, skeleton_for
    from alloykit.evaluation.tasks import context_text, load_task

    write_jsonl(tmp_path / "d.jsonl", [{"q": "w1", "a": "w2"}])
    task = load_task(
        write_task(
            tmp_path / "chat.yml",
            "data: d.jsonl\nprompt: '{{ q }}'\ntarget: a\nchat_template: true\nmetric: exact_match\n",
        )
    )
    skeleton = skeleton_for(resolve_source(str(family["ft1"])), EvalOptions())
    assert _chat(skeleton) is None  # the toy tokenizer has no template
    skeleton.tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    try:
        assert context_text(task, task.examples[0], _chat(skeleton)) == "[user] w1 [assistant]"
    finally:
        skeleton.tokenizer.chat_template = None
