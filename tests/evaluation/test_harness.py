"""The lm-evaluation-harness bridge agrees with lm-eval's own Hugging Face model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A harness multiple-choice task and a perplexity task defined on local JSONL files."""
    folder = tmp_path_factory.mktemp("harness")
    rows = [
        {"q": f"w{i} w{i + 1} w{i + 2}", "options": [f"w{i + 3}", f"w{i + 7} w{i}"], "label": i % 2}
        for i in range(8)
    ]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{options}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "local_ppl.yaml").write_text(
        "task: local_ppl\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{q}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return folder


def test_bridge_scores_equal_lm_evals_own_hf_model(
    family: dict[str, Path], harness_tasks: Path
) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from alloykit.evaluation.harness import run_harness

    names = ["local_mc", "local_ppl"]
    ours = run_harness(str(family["ft1"]), names, include=harness_tasks)["results"]
    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(family["ft1"]), batch_size=4, device="cpu"),
        tasks=names,
        task_manager=TaskManager(include_path=str(harness_tasks), include_defaults=False),
        log_samples=False,
    )["results"]
    for task, metric in [
        ("local_mc", "acc,none"),
        ("local_mc", "acc_norm,none"),
        ("local_ppl", "word_perplexity,none"),
        ("local_ppl", "bits_per_byte,none"),
    ]:
        assert ours[task][metric] == pytest.approx(reference[task][metric], rel=1e-5), metric


def test_a_merge_config_runs_in_memory(
    tmp_path: Path, family: dict[str, Path], harness_tasks: Path
) -> None:
    from alloykit.evaluation.harness import run_harness

    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {family['ft1']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {family['ft2']}\n    parameters: {{weight: 1}}\n"
    )
    result = run_harness(recipe, ["local_mc"], include=harness_tasks, limit=4)
    assert len(result["recipe_hash"]) == 64
    assert 0.0 <= result["results"]["local_mc"]["acc,none"] <= 1.0


def test_the_cli_runs_harness_tasks(
    tmp_path: Path, family: dict[str, Path], harness_tasks: Path
) -> None:
    from tests.helpers import run_cli

    out = tmp_path / "harness.json"
    result = run_cli(
        "evaluate",
        family["ft1"],
        "--harness-task",
        "local_mc",
        "--harness-include",
        harness_tasks,
        "--limit",
        "3",
        "-o",
        out,
        "-q",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["model"] == str(family["ft1"]) and "acc,none" in data["results"]["local_mc"]


def test_generations_equal_lm_evals_own_hf_model(family: dict[str, Path]) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from alloykit.evaluation.harness import harness_model

    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]

    def requests(kind: str, settings: dict[str, object] | None) -> list[Instance]:
        return [
            Instance(kind, {}, (p, settings) if settings is not None else (p,), i)
            for i, p in enumerate(prompts)
        ]

    ours = harness_model(str(family["ft1"]))
    reference = HFLM(pretrained=str(family["ft1"]), batch_size=4, device="cpu")
    settings = {"until": ["w5"], "max_gen_toks": 6}
    generated = ours.generate_until(requests("generate_until", settings))
    assert generated == reference.generate_until(requests("generate_until", settings))
    assert any(text.strip() for text in generated)
    rolling = ours.loglikelihood_rolling(requests("loglikelihood_rolling", None))
    expected = reference.loglikelihood_rolling(requests("loglikelihood_rolling", None))
    assert rolling == pytest.approx(expected, rel=1e-5)
