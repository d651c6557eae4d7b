"""What is evaluated: merge configs in memory, folders, state dicts in a reused skeleton, heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit.evaluation import evaluate, score
from alloykit.toymodels import ToySpec, make_family
from tests.evaluation.fixtures import write_jsonl, write_task

BERT = ToySpec(model_type="bert", vocab_size=32, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 100, 9)) for _ in range(4)]
    write_jsonl(folder / "text.jsonl", [{"text": d} for d in docs])
    write_jsonl(
        folder / "mc.jsonl",
        [
            {"q": f"w{i} w{i + 1}", "options": [f"w{i + 2}", f"w{i + 3}"], "answer": i % 2}
            for i in range(6)
        ],
    )
    return [
        write_task(
            folder / "ppl.yml", "data: text.jsonl\nprompt: '{{ text }}'\nmetric: perplexity\n"
        ),
        write_task(
            folder / "mc.yml",
            "data: mc.jsonl\nprompt: '{{ q }}'\nchoices: options\ntarget: answer\nmetric: multiple_choice\n",
        ),
    ]


def test_a_merge_config_in_memory_scores_like_the_folder_merge_writes(
    tmp_path: Path, family: dict[str, Path], tasks: list[Path]
) -> None:
    from alloykit.pipeline import merge, merge_in_memory

    recipe = tmp_path / "linear.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {family['ft1']}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {family['ft2']}\n    parameters: {{weight: 0.7}}\ndtype: float32\n"
    )
    in_memory = evaluate(recipe, tasks)
    written = merge(recipe, tmp_path / "merged")
    on_disk = evaluate(tmp_path / "merged", tasks)
    assert not (tmp_path / "merged").samefile(tmp_path) and in_memory.model == str(recipe)
    for name in ("ppl", "mc"):
        assert in_memory.tasks[name].scores == on_disk.tasks[name].scores
    assert in_memory.recipe_hash == written.recipe_hash == on_disk.recipe_hash
    merged = evaluate(merge_in_memory(recipe), tasks)  # a MergedState is accepted as is
    assert merged.tasks["mc"].scores == in_memory.tasks["mc"].scores
    base = evaluate(family["base"], tasks)
    assert base.recipe_hash is None and base["ppl"] != in_memory["ppl"]


def test_new_weights_are_loaded_into_the_same_skeleton(
    family: dict[str, Path], tasks: list[Path]
) -> None:
    from alloykit.evaluation.model import _read_state

    first = evaluate(family["ft1"], tasks)
    skeleton = score._SKELETON[0]
    parameter = next(skeleton.model.parameters())
    states = {name: _read_state(family[name]) for name in ("ft2", "ft3")}
    for name, state in states.items():
        again = evaluate(state, tasks, like=family["base"])
        assert score._SKELETON[0] is skeleton and next(skeleton.model.parameters()) is parameter
        assert again["ppl"] != first["ppl"]
        fresh = evaluate(family[name], tasks)  # read from its folder into the same skeleton
        for task in ("ppl", "mc"):
            assert again.tasks[task].scores == fresh.tasks[task].scores


def test_a_state_dict_without_like_is_refused(family: dict[str, Path], tasks: list[Path]) -> None:
    from alloykit.errors import AlloyError

    with pytest.raises(AlloyError, match="like="):
        evaluate({"x": torch.zeros(1)}, tasks)


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bare BERT base and ft1, and 'clf': ft1's backbone with a seeded random 2-class head."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert")
    folders = make_family(root, BERT, finetunes=1)
    config = BertConfig.from_pretrained(folders["ft1"])
    config.num_labels = 2
    config.id2label = {0: "neg", 1: "pos"}
    config.label2id = {"neg": 0, "pos": 1}
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(_bert_state(folders["ft1"]))
    with torch.no_grad():
        model.classifier.weight.normal_(0, 5.0)
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0]))
    model.save_pretrained(root / "clf")
    import shutil

    for pattern in ("tokenizer*", "special_tokens_map.json"):
        for file in folders["ft1"].glob(pattern):
            shutil.copy(file, root / "clf" / file.name)
    return {**folders, "clf": root / "clf"}


def _bert_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_classification_scores_the_evaluated_backbone_with_the_task_head(
    tmp_path: Path, bert_family: dict[str, Path]
) -> None:
    from transformers import AutoModelForSequenceClassification

    rows = [{"text": f"w{i} w{i + 3} w{2 * i}", "label": ["neg", "pos"][i % 2]} for i in range(10)]
    write_jsonl(tmp_path / "cls.jsonl", rows)
    task = write_task(
        tmp_path / "cls.yml",
        f"data: cls.jsonl\nprompt: '{{{{ text }}}}'\ntarget: label\nhead: {bert_family['clf']}\n"
        "metric: classification\n",
    )
    # the hand computation: the head model with the base's backbone put in
    model = AutoModelForSequenceClassification.from_pretrained(bert_family["clf"]).eval()
    model.bert.load_state_dict(_bert_state(bert_family["base"]))
    predictions = []
    for row in rows:
        ids = torch.tensor([[int(w[1:]) + 3 for w in row["text"].split()]])
        with torch.no_grad():
            predictions.append(int(model(input_ids=ids).logits.argmax(-1)))
    labels = [i % 2 for i in range(10)]
    expected = sum(p == y for p, y in zip(predictions, labels, strict=True)) / 10
    result = evaluate(bert_family["base"], task)
    assert result["cls"] == pytest.approx(expected)
    own = evaluate(bert_family["clf"], task)  # the fine-tune scored with its own backbone
    model = AutoModelForSequenceClassification.from_pretrained(bert_family["clf"]).eval()
    with torch.no_grad():
        own_predictions = [
            int(
                model(
                    input_ids=torch.tensor([[int(w[1:]) + 3 for w in r["text"].split()]])
                ).logits.argmax(-1)
            )
            for r in rows
        ]
    assert own["cls"] == pytest.approx(
        sum(p == y for p, y in zip(own_predictions, labels, strict=True)) / 10
    )
    assert predictions != own_predictions  # the backbone really changed the answers


def test_a_model_without_an_lm_head_is_named_for_generation_tasks(
    bert_family: dict[str, Path], tasks: list[Path]
) -> None:
    import alloykit
    from alloykit.errors import TaskError

    assert alloykit.evaluate is evaluate  # the function, not the evaluation package
    with pytest.raises(
        TaskError, match=r"task 'ppl': model '.*base' \(BertModel\) has no language"
    ):
        evaluate(bert_family["base"], tasks[0])
