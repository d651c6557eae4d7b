"""A tiny search problem: two fine-tunes, each the only one good at its own synthetic task.

Task ``a`` holds multiple-choice items on which ft1 prefers the other answer than the base
model and ft2 agrees with the base; the right answer is ft1's. Task ``b`` is the same for ft2.
So ft1 scores 1 on ``a`` and 0 on ``b``, ft2 the reverse, and the objective (their mean) needs
both task vectors: the question is how much of each to add.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alloykit.toymodels import ToySpec, make_family

ITEMS = 40  # per task and split: one item is 2.5 points of a task, 1.25 of the mean


def _preferences(folder: Path, prompts: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        logp = model(prompts).logits[:, -1].log_softmax(-1)
    pair = logp.gather(1, choices)
    return (pair[:, 1] > pair[:, 0]).long()


def _word(token: int) -> str:
    return f"w{token - 3}"


def make_problem(root: Path) -> dict[str, Path]:
    """Write the models, the task files ``a.yml`` and ``b.yml`` and a template; return paths."""
    models = make_family(root / "models", ToySpec(), finetunes=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    count = 2000
    prompts = torch.randint(3, 128, (count, 3), generator=generator)
    choices = torch.randint(3, 128, (count, 2), generator=generator)
    prefs = {name: _preferences(folder, prompts, choices) for name, folder in models.items()}
    paths = dict(models)
    for task, own, other in (("a", "ft1", "ft2"), ("b", "ft2", "ft1")):
        chosen = (prefs[own] != prefs["base"]) & (prefs[other] == prefs["base"])
        rows = []
        for i in chosen.nonzero().flatten().tolist():
            rows.append(
                {
                    "text": " ".join(_word(t) for t in prompts[i].tolist()),
                    "options": [_word(t) for t in choices[i].tolist()],
                    "label": int(prefs[own][i]),
                }
            )
        splits = {"validation": rows[:ITEMS], "test": rows[ITEMS : 2 * ITEMS]}
        for split, part in splits.items():
            (root / f"{task}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        (root / f"{task}.yml").write_text(
            f"name: {task}\n"
            f"data: {{validation: {task}_validation.jsonl, test: {task}_test.jsonl}}\n"
            'prompt: "{{ text }}"\n'
            "choices: options\n"
            "target: label\n"
            "metric: multiple_choice\n"
        )
        paths[task] = root / f"{task}.yml"
    return paths


TEMPLATE = """\
merge_method: task_arithmetic
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 1.0}
  - model: models/ft2
    parameters: {weight: 1.0}
"""


def write_search(
    root: Path, optimiser: str, budget: int, *, extra: str = "", name: str = ""
) -> Path:
    """A search file over the two task-vector weights in [0, 2]."""
    path = root / (name or f"search_{optimiser}.yml")
    (root / "template.yml").write_text(TEMPLATE)
    path.write_text(
        "template: template.yml\n"
        "space:\n"
        "  - param: models[*].parameters.weight\n"
        "    low: 0.0\n"
        "    high: 2.0\n"
        "objective:\n"
        "  tasks:\n"
        "    - task: a.yml\n"
        "    - task: b.yml\n"
        f"{extra}"
        f"optimiser: {{name: {optimiser}, budget: {budget}, seed: 0}}\n"
    )
    return path
