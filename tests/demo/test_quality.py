"""The merge-quality harness (alloykit.demo) on a tiny BERT and synthetic tasks.

The real benchmark (all-MiniLM-L6-v2, PyPI data) runs by hand; these tests check its pieces:
stratified fixed splits, expert caching, merging backbones across the ``bert.`` prefix,
validation-only selection and the test split read once per reported cell.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from alloykit.demo.core import (
    DemoError,
    Scorer,
    TrainConfig,
    expert_dir,
    load_state,
    merge_backbones,
    strip_backbone,
)
from alloykit.demo.data import MATH_FAMILIES, DemoDataError, Task, build_task, make_task, math_texts
from alloykit.demo.experiment import (
    RecipeSearch,
    format_table,
    grid_points,
    plot_table,
    run_table,
)

WORDS = [f"w{i}" for i in range(40)]
KEYS = {"alpha": ["red", "blue", "green"], "beta": ["cat", "dog", "fish"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BertModel with a word-piece tokenizer over WORDS and the key words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("base")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS,
        *(w for ws in KEYS.values() for w in ws),
    ]
    # transformers 5 ignores vocab_file=: the vocabulary goes in as a mapping
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    assert "[UNK]" not in tokenizer.tokenize(" ".join(vocab[5:]))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


def _task(name: str, seed: int) -> Task:
    rng = random.Random(seed)
    by_label = {
        key: [" ".join([*rng.sample(WORDS, 3), key, *rng.sample(WORDS, 2)]) for _ in range(30)]
        for key in KEYS[name]
    }
    return make_task(name, by_label, seed, per_label=20)


def test_make_task_is_stratified_fixed_and_disjoint() -> None:
    by_label = {
        "a": [f"a {i}" for i in range(50)] + ["a 1", "A 1"],
        "b": [f"b {i}" for i in range(10)],
    }
    one, two = make_task("t", by_label, 0, 40), make_task("t", by_label, 0, 40)
    assert one.train == two.train and one.test == two.test
    assert make_task("t", by_label, 1, 40).train != one.train
    texts = [t for split in (one.train, one.validation, one.test) for t, _ in split]
    assert len(texts) == len(set(texts)) == 40 + 10  # deduplicated (case too), capped per label
    assert sum(y == 1 for _, y in one.train) == 6 and sum(y == 1 for _, y in one.test) == 2


def test_math_questions_ship_with_the_package(tmp_path: Path) -> None:
    # generated once (mathematics-dataset is not reproducible across processes) and read back
    questions = math_texts()
    assert sorted(questions) == sorted(MATH_FAMILIES)
    assert all(len(set(v)) == len(v) == 100 for v in questions.values())
    task = build_task("math", 0, 100)
    assert task.labels == sorted(MATH_FAMILIES) and len(task.train) == 7 * 60
    assert build_task("math", 0, 100).test == task.test  # the same rows in every process
    bad = tmp_path / "q.json"
    bad.write_text("{}")
    with pytest.raises(DemoDataError, match="q.json"):
        math_texts(bad)


def test_chat_topic_takes_its_own_cap() -> None:
    pytest.importorskip("chatterbot_corpus")
    task = build_task("chat_topic", 0, 100)
    assert len(task.labels) == 8
    counts = [sum(y == i for _, y in task.train + task.validation + task.test) for i in range(8)]
    assert max(counts) == 150  # emotion, coding and ai hold more than 150 utterances


def test_grid_points() -> None:
    assert grid_points({}) == [{}]
    assert grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


def test_table_end_to_end_reads_test_once_and_caches(base: Path, tmp_path: Path) -> None:
    tasks = [_task("alpha", 0), _task("beta", 1)]
    train = TrainConfig(steps=6, batch_size=8, max_length=12, threads=1)
    methods = {"linear": {}, "task_arithmetic": {"lambda": [0.5, 1.0]}, "ties": {"density": [0.5]}}
    logs: list[str] = []
    table = run_table(
        tmp_path, methods, {"nuslerp": {}}, train=train, tasks=tasks, base=base, log=logs.append
    )
    names = [r.name for r in table.rows]
    assert names[:2] == ["linear probe (frozen base)", "base + experts' heads (no merge)"]
    assert {"expert: alpha", "expert: beta", "linear", "task_arithmetic", "ties"} <= set(names)
    assert "nuslerp (best pair)" in names
    assert all(count == 1 for count in table.test_reads.values())
    assert len(table.test_reads) == 2 * (len(table.rows)) + 0  # every cell of every row once
    ta = next(r for r in table.rows if r.name == "task_arithmetic")
    assert ta.params["lambda"] in (0.5, 1.0) and ta.val_mean == ta.val_mean
    assert sum("task_arithmetic" in line for line in logs) == 2  # the grid ran on validation
    text = format_table(table)
    assert "| linear |" in text and "mean norm" in text
    assert plot_table(table, tmp_path / "bars.png").stat().st_size > 0
    # the experts are cached: a second run fine-tunes nothing
    stamp = {
        t.name: (expert_dir(tmp_path, t, train) / "model.safetensors").stat().st_mtime_ns
        for t in tasks
    }
    logs.clear()
    again = run_table(
        tmp_path, {"linear": {}}, train=train, tasks=tasks, base=base, log=logs.append
    )
    assert not any("fine-tuning" in line for line in logs)
    assert stamp == {
        t.name: (expert_dir(tmp_path, t, train) / "model.safetensors").stat().st_mtime_ns
        for t in tasks
    }
    assert again.expert_acc == table.expert_acc
    # the rows that depend only on the cache (experts, probes, base) come from cache/test:
    # the second run reads test only for its merge
    assert again.test_reads == {"linear / alpha": 1, "linear / beta": 1}
    fixed = ["linear probe (frozen base)", "base + experts' heads (no merge)", "expert: alpha"]
    for name in fixed:
        first = next(r for r in table.rows if r.name == name)
        assert next(r for r in again.rows if r.name == name).acc == first.acc
    assert len(again.cached_cells) == 2 * 4  # probe, base and two experts, on both tasks


def test_recipe_search_row_reads_test_once(base: Path, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    tasks = [_task("alpha", 0), _task("beta", 1)]
    train = TrainConfig(steps=6, batch_size=8, max_length=12, threads=1)
    search = RecipeSearch("task_arithmetic", {"lambda": (0.2, 1.5)}, weights=(0.1, 1.0), trials=4)
    logs: list[str] = []
    table = run_table(
        tmp_path,
        {},
        train=train,
        tasks=tasks,
        base=base,
        probe=False,
        cross=False,
        log=logs.append,
        searches={"ta weights": search},
    )
    row = next(r for r in table.rows if r.name == "search: ta weights")
    assert 0.2 <= row.params["lambda"] <= 1.5 and len(row.params["weights"]) == 2
    assert all(0.1 <= w <= 1.0 for w in row.params["weights"])
    assert sum(line.startswith("  search task_arithmetic") for line in logs) == 4
    assert table.test_reads == {  # the experts' own cells (for "norm") and the search row's
        "expert: alpha / alpha": 1,
        "expert: beta / beta": 1,
        "search: ta weights / alpha": 1,
        "search: ta weights / beta": 1,
    }
    # the best point's validation score is the best of the trials' (logged) scores
    scores = [float(line.rsplit("val ", 1)[1]) for line in logs if line.startswith("  search")]
    assert round(row.val_mean, 1) == max(scores)


def test_merge_backbones_across_the_prefix(base: Path, tmp_path: Path) -> None:
    from alloykit.demo.core import get_expert

    train = TrainConfig(steps=2, batch_size=8, max_length=12, threads=1)
    experts = [
        get_expert(tmp_path, _task(n, i), base, train, lambda _: None) for i, n in enumerate(KEYS)
    ]
    merged = merge_backbones("linear", base, experts, {})
    states = [strip_backbone(load_state(e)) for e in experts]
    assert set(merged) == set(states[0]) and not any(k.startswith("classifier") for k in merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (states[0][name] + states[1][name]) / 2)
    ta = merge_backbones("task_arithmetic", base, experts, {"lambda": 0.5})
    for name in merged:  # two experts, lambda 0.5: the average again
        torch.testing.assert_close(ta[name], merged[name], atol=1e-6, rtol=1e-5)


def test_scorer_refuses_a_partial_backbone(base: Path) -> None:
    task = _task("alpha", 0)
    head = {"classifier.weight": torch.zeros(3, 16), "classifier.bias": torch.zeros(3)}
    scorer = Scorer(base, [task], {"alpha": head}, max_length=12, threads=1)
    state = strip_backbone(load_state(base))
    scorer.load(state)
    assert scorer.accuracy("x", "alpha", "test") == pytest.approx(
        100.0 * sum(y == 0 for _, y in task.test) / len(task.test)
    )
    state.pop("pooler.dense.weight")
    with pytest.raises(DemoError, match="backbone lacks 1 tensors"):
        scorer.load(state)


def test_scorer_agrees_with_evaluate_classification(base: Path, tmp_path: Path) -> None:
    """The demo's scorer and ``alloykit.evaluate``'s classification metric give one accuracy
    for one model and one split (an expert, and the base with that expert's head)."""
    from alloykit.demo.core import get_expert
    from alloykit.evaluation import evaluate
    from tests.evaluation.fixtures import write_jsonl, write_task

    task = _task("alpha", 0)
    train = TrainConfig(steps=30, batch_size=8, lr=1e-2, max_length=12, threads=1)
    expert = get_expert(tmp_path, task, base, train, lambda _: None)
    state = load_state(expert)
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    scorer = Scorer(base, [task], {"alpha": head}, train.max_length, batch_size=5, threads=1)
    rows = [{"text": t, "label": task.labels[y]} for t, y in task.test]
    write_jsonl(tmp_path / "test.jsonl", rows)
    spec = write_task(
        tmp_path / "alpha.yml",
        f"data: test.jsonl\nprompt: '{{{{ text }}}}'\ntarget: label\nhead: {expert}\n"
        "metric: classification\n",
    )
    checked = set()
    for label, backbone, model in (
        ("expert", strip_backbone(state), expert),
        ("base", strip_backbone(load_state(base)), base),
    ):
        scorer.load(backbone)
        ours = scorer.accuracy(label, "alpha", "test")
        theirs = 100.0 * evaluate(model, spec)["alpha"]
        assert ours == pytest.approx(theirs, abs=1e-9), label
        checked.add(ours)
    assert len(checked) == 2  # the two models differ, so the check is not vacuous


def test_validation_scores_are_cached(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run merges each method once (at its chosen point) and reports the same row."""
    from alloykit.demo import experiment

    merges: list[dict[str, object]] = []
    real = experiment.merge_backbones

    def counting(method: str, *args: object, **kwargs: object) -> object:
        merges.append(dict(args[2]))  # type: ignore[call-overload]
        return real(method, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "merge_backbones", counting)
    tasks = [_task("alpha", 0), _task("beta", 1)]
    train = TrainConfig(steps=2, batch_size=8, max_length=12, threads=1)
    grid = {"task_arithmetic": {"lambda": [0.3, 0.6, 1.0]}}

    def run() -> list[object]:
        table = run_table(
            tmp_path, grid, train=train, tasks=tasks, base=base, probe=False, log=lambda _: None
        )
        return [(r.name, r.acc, r.params, r.val_mean) for r in table.rows]

    first = run()
    assert len(merges) == 3
    merges.clear()
    assert run() == first
    assert merges == [first[-1][2]]  # only the chosen point, merged for its test row
    assert len(list((tmp_path / "validation").glob("*.json"))) == 3


def test_parallel_fine_tuning_equals_serial(base: Path, tmp_path: Path) -> None:
    """Experts fine-tuned by worker processes are bit for bit the ones fine-tuned in process."""
    from alloykit.demo.core import get_expert, get_experts

    tasks = [_task("alpha", 0), _task("beta", 1)]
    train = TrainConfig(steps=3, batch_size=8, max_length=12, threads=1)
    logs: list[str] = []
    parallel = get_experts(tmp_path / "p", tasks, base, train, workers=2, log=logs.append)
    assert any("2 at a time" in line for line in logs)
    for task in tasks:
        serial = get_expert(tmp_path / "s", task, base, train, lambda _: None)
        assert parallel[task.name].name == serial.name
        one, two = load_state(parallel[task.name]), load_state(serial)
        assert set(one) == set(two)
        assert all(torch.equal(one[k], two[k]) for k in one)


def test_demo_cli_help_and_bad_option() -> None:
    from typer.testing import CliRunner

    from alloykit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "alloykit demo --threads 2" in result.output
    bad = runner.invoke(app, ["demo", "--threads", "two"])
    assert bad.exit_code != 0
