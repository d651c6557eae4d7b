"""Task files: rendering, few-shot, splits, limit; and bad input, each named in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from alloykit.errors import TaskError
from alloykit.evaluation.metrics import exact_match, extract_answer, normalize_text
from alloykit.evaluation.tasks import MetricSpec, Normalize, context_text, load_task
from tests.evaluation.fixtures import write_jsonl, write_task

ROWS = [{"q": f"w{i}", "a": f"w{i + 1}"} for i in range(6)]


def test_few_shot_examples_come_from_train_and_are_seeded(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "test.csv").write_text("q,a\nw10,w11\nw12,w13\nw14,w15\n")
    text = (
        "name: arith\ndata: {train: train.jsonl, test: test.csv}\nprompt: 'Q: {{ q }}'\n"
        "target: a\nanswer_prefix: ' A: '\nfewshot: 2\nlimit: 2\nseed: 7\nmetric: exact_match\n"
    )
    task = load_task(write_task(tmp_path / "t.yml", text))
    assert task.name == "arith" and len(task.examples) == 2
    context = context_text(task, task.examples[0])
    shots = context.split("\n\n")
    assert len(shots) == 3 and shots[-1] == "Q: w10"
    assert all(s.startswith("Q: w") and " A: w" in s for s in shots[:2])
    assert context == context_text(
        load_task(tmp_path / "t.yml"), load_task(tmp_path / "t.yml").examples[0]
    )
    assert task.examples[0].targets == ("w11",)


def test_chat_template_wraps_shots_as_turns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    text = (
        "data: {train: d.jsonl, validation: d.jsonl}\nprompt: '{{ q }}'\ntarget: a\nfewshot: 1\n"
        "chat_template: true\nsystem_prompt: Be brief.\nmetric: exact_match\n"
    )
    task = load_task(write_task(tmp_path / "c.yml", text))
    seen: list[list[dict[str, str]]] = []
    context_text(task, task.examples[0], lambda messages: seen.append(messages) or "x")
    roles = [m["role"] for m in seen[0]]
    assert roles == ["system", "user", "assistant", "user"]
    with pytest.raises(TaskError, match="chat_template is true but the tokenizer has none"):
        context_text(task, task.examples[0], None)


def test_normalisation_and_extraction() -> None:
    options = Normalize(ignore_case=True, ignore_punctuation=True, regexes_to_ignore=["^the "])
    assert normalize_text("  The Answer!  ", options) == "answer"
    assert extract_answer("so 12 then 34", r"(\d+)", "last") == "34"
    assert extract_answer("no digits", r"(\d+)") == ""
    metric = MetricSpec(kind="exact_match", extract=r"is (\d+)")
    assert exact_match("the answer is 42.", ["42"], metric) == 1.0
    assert exact_match("the answer is 41.", ["42", "43"], metric) == 0.0


@pytest.mark.parametrize(
    ("task", "data", "message"),
    [
        ("data: d.jsonl\nprompt: '{{ q }}'\n", None, r"metric: missing"),
        ("data: d.jsonl\nmetric: exact_match\ntarget: a\n", None, r"prompt: missing"),
        ("data: d.jsonl\nprompt: '{{ q }}'\nmetric: exact_match\n", None, "needs field target"),
        (
            "data: d.jsonl\nprompt: '{{ question }}'\ntarget: a\nmetric: exact_match\n",
            None,
            "prompt uses column 'question', which data file .*d.jsonl' does not have",
        ),
        (
            "data: d.jsonl\nprompt: '{{ q }}'\ntarget: answer\nmetric: exact_match\n",
            None,
            "target uses column 'answer'",
        ),
        ("data: d.jsonl\nprompt: '{{ q }}'\nmetric: perplexity\n", "", "d.jsonl' has no rows"),
        ("data: e.jsonl\nprompt: '{{ q }}'\nmetric: perplexity\n", None, "e.jsonl' does not exist"),
        ("data: d.jsonl\nprompt: '{{ q }}'\nmetric: bleu\n", None, "metric.kind: Input should be"),
        (
            "data: d.jsonl\nprompt: '{{ q }}'\nmetric: perplexity\ntemperature: 1\n",
            None,
            "temperature",
        ),
        (
            "data: d.jsonl\nprompt: '{{ q }}'\ntarget: a\nmetric: classification\n",
            None,
            "needs field head",
        ),
        (
            "data: d.jsonl\nprompt: '{{ q }}'\nchoices: ['yes', 'no']\ntarget: a\nmetric: multiple_choice\n",
            None,
            r"target, row 0: 'w1' is neither an index, a letter nor one of \['yes', 'no'\]",
        ),
        (
            "data: d.jsonl\nprompt: '{{ q }'\nmetric: perplexity\n",
            None,
            r"bad.yml': prompt '\{\{ q \}' is not a valid template",
        ),
        (
            "data: d.jsonl\nprompt: x\nfewshot: 2\ntarget: a\nmetric: exact_match\n",
            None,
            "train split",
        ),
    ],
)
def test_bad_task_files_name_the_field(
    tmp_path: Path, task: str, data: str | None, message: str
) -> None:
    if data is None:
        write_jsonl(tmp_path / "d.jsonl", ROWS)
    else:
        (tmp_path / "d.jsonl").write_text(data)
    with pytest.raises(TaskError, match=message) as raised:
        load_task(write_task(tmp_path / "bad.yml", task))
    assert "\n" not in str(raised.value)


def test_a_row_missing_a_column_is_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"q": "w1", "a": "w2"}, {"q": "w3"}])
    with pytest.raises(TaskError, match="target, row 1: no column 'a'"):
        load_task(
            write_task(
                tmp_path / "t.yml",
                "data: d.jsonl\nprompt: '{{ q }}'\ntarget: a\nmetric: exact_match\n",
            )
        )


def test_a_classification_head_that_is_not_one_is_named(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    from alloykit.evaluation import evaluate

    write_jsonl(tmp_path / "d.jsonl", [{"q": "w1", "a": "0"}])
    task = write_task(
        tmp_path / "cls.yml",
        f"data: d.jsonl\nprompt: '{{{{ q }}}}'\ntarget: a\nhead: {family['ft2']}\nmetric: classification\n",
    )
    with pytest.raises(TaskError, match=r"head model '.*ft2' has no sequence-classification head"):
        evaluate(family["ft1"], task)


def test_a_row_is_never_its_own_few_shot_example(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    text = (
        "data: {train: d.jsonl, test: d.jsonl}\nprompt: '{{ q }}'\ntarget: a\nfewshot: 5\n"
        "metric: exact_match\n"
    )
    task = load_task(write_task(tmp_path / "t.yml", text))
    for example in task.examples:
        assert len(example.shots) == 5
        assert example.query not in [query for query, _ in example.shots]
