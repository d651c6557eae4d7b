"""Merge-quality benchmark on a real pretrained encoder (all-MiniLM-L6-v2) and real fine-tunes.

Four text-classification tasks from PyPI-shipped data (alloykit.demo.data), one full
fine-tune per task (cached), every catalogue method merging the experts' backbones, each
merged backbone scored on every task with the task's own head. Hyper-parameters are chosen on
validation from GRIDS below; the test split is read once per reported cell (asserted).

    HF_HUB_OFFLINE=1 python benchmarks/quality/encoder/run.py --cache ~/.cache/alloykit/quality \
        --out benchmarks/quality/encoder/table.md
    python benchmarks/quality/encoder/run.py --experts-only     # fine-tune and cache only
    python benchmarks/quality/encoder/run.py --no-search        # without the recipe-search rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAMBDA = [0.3, 0.5, 0.7, 1.0]
HALF_ONE = [0.5, 1.0]
ONE_AND_HALF = [1.0, 1.5]

# Multi-model methods (all experts at once): the validation grid of each, in the order they
# run. The grids are small (2-6 points past the first five methods) so that the whole
# catalogue runs in well under an hour on a 2-core machine; a method's row names the chosen
# point. "ties+aim" is TIES with activation-informed merging on top (its strength "aim");
# regmean and aim use the calibration texts of alloykit.demo.experiment.calibration_section
# (the tasks' train splits only).
GRIDS: dict[str, dict[str, list]] = {
    "linear": {},
    "task_arithmetic": {"lambda": LAMBDA},
    "ties": {"density": [0.3, 0.5, 0.7], "lambda": ONE_AND_HALF},
    "tsv": {"alpha": [0.7, 1.0, 1.5]},
    "iso_c": {"alpha": [0.7, 1.0, 1.5]},
    "regmean": {"alpha": [0.5, 0.7, 0.9]},
    "ties+aim": {"density": [0.5, 0.7], "lambda": [1.0], "aim": [0.3, 0.6, 0.9]},
    "iso_cts": {"alpha": [0.7, 1.0, 1.5]},
    "magnitude_prune": {"density": [0.5], "lambda": HALF_ONE},
    "dare_linear": {"density": [0.5], "lambda": HALF_ONE},
    "dare_ties": {"density": [0.5], "lambda": ONE_AND_HALF},
    "della": {"density": [0.5], "lambda": ONE_AND_HALF},
    "della_linear": {"density": [0.5], "lambda": HALF_ONE},
    "breadcrumbs": {"density": [0.9], "lambda": HALF_ONE},
    "breadcrumbs_ties": {"density": [0.9], "lambda": ONE_AND_HALF},
    "magmax": {"lambda": HALF_ONE},
    "consensus": {"lambda": HALF_ONE},
    "pcb": {"pcb_ratio": [0.1], "lambda": HALF_ONE},
    "sce": {"select_topk": [0.1, 1.0]},
    "model_stock": {},
    "multislerp": {},
    "karcher": {},
    "ram": {},
    "ramplus_tl": {},
}
# Recipe search rows: Optuna's TPE sampler (seed 0) on the validation splits' mean accuracy,
# the best point scored on test once. TIES with one weight per expert, its density and lambda
# (6 dimensions, 30 trials): what a search adds over TIES's grid above.
SEARCH_SPACES = {
    "ties, per-expert weights": {
        "method": "ties",
        "ranges": {"density": (0.1, 0.9), "lambda": (0.5, 2.0)},
        "weights": (0.2, 1.5),
        "trials": 30,
    },
}
# Two-model methods: every pair of experts, the pair with the best validation mean reported.
PAIR_GRIDS: dict[str, dict[str, list]] = {"nuslerp": {}}
# Fine-tuning candidates for an expert whose default fine-tune (TrainConfig) is weak: each is
# trained and scored on the task's validation split (`--select-train TASK`); the best goes into
# alloykit.demo.core.TASK_TRAIN. The test split is not read.
TRAIN_CANDIDATES: list[dict] = [
    {},  # the defaults: 300 steps, lr 8e-5, seed 0
    {"lr": 1.5e-4},
]
# One-model methods (slerp, nearswap, arcee_fusion, expo, passthrough) combine one fine-tune
# with the base: not multi-task merges, so not in the table.


def select_train(args: argparse.Namespace, train) -> None:
    """Fine-tune each of TRAIN_CANDIDATES for one task; print each one's validation accuracy."""
    from dataclasses import replace

    from alloykit.demo.core import (
        Scorer,
        base_model_path,
        get_expert,
        load_state,
        strip_backbone,
    )
    from alloykit.demo.experiment import load_tasks

    base = base_model_path()
    (task,) = load_tasks([args.select_train], 0, 100)
    picks = range(len(TRAIN_CANDIDATES)) if args.candidate < 0 else [args.candidate]
    for i in picks:
        config = replace(train, **TRAIN_CANDIDATES[i])
        state = load_state(get_expert(args.cache, task, base, config))
        head = {k: v for k, v in state.items() if k.startswith("classifier.")}
        scorer = Scorer(base, [task], {task.name: head}, config.max_length, threads=args.threads)
        scorer.load(strip_backbone(state))
        acc = scorer.accuracy("candidate", task.name, "validation")
        print(f"{task.name} candidate {TRAIN_CANDIDATES[i]}: validation {acc:.1f}", flush=True)


def main() -> None:
    """Run the benchmark and write the table (Markdown) and the raw numbers (JSON)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "src"))
    from alloykit.demo.core import TrainConfig
    from alloykit.demo.experiment import RecipeSearch, format_table, load_tasks, run_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/alloykit/quality")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("table.md"))
    parser.add_argument("--methods", default="", help="comma-separated subset of GRIDS")
    parser.add_argument("--no-pairs", action="store_true")
    parser.add_argument("--no-search", action="store_true", help="leave out the search rows")
    parser.add_argument("--experts-only", action="store_true")
    parser.add_argument("--task", default="", help="with --experts-only: this task only")
    parser.add_argument("--select-train", default="", metavar="TASK")
    parser.add_argument("--candidate", type=int, default=-1, help="with --select-train: one only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args()
    train = TrainConfig(steps=args.steps, threads=args.threads)
    if args.select_train:
        sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "src"))
        select_train(args, train)
        return
    if args.experts_only:
        from alloykit.demo.core import base_model_path, get_expert, task_config
        from alloykit.demo.data import TASK_NAMES

        start = time.perf_counter()
        base = base_model_path()
        names = [args.task] if args.task else TASK_NAMES
        for task in load_tasks(names, 0, 100):
            t0 = time.perf_counter()
            get_expert(args.cache, task, base, task_config(task.name, train))
            print(f"{task.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"experts: {time.perf_counter() - start:.0f} s")
        return
    wanted = [m for m in args.methods.split(",") if m] or list(GRIDS)
    grids = {m: GRIDS[m] for m in wanted}
    pairs = {} if args.no_pairs else PAIR_GRIDS
    searches = {} if args.no_search else {k: RecipeSearch(**v) for k, v in SEARCH_SPACES.items()}
    partial = args.out.with_suffix(".partial.md")

    def on_row(table) -> None:
        partial.write_text(
            f"Partial ({time.perf_counter() - start:.0f} s):\n\n{format_table(table)}\n"
        )

    start = time.perf_counter()
    table = run_table(
        args.cache,
        grids,
        pairs,
        train=train,
        log=lambda s: print(s, flush=True),
        on_row=on_row,
        workers=args.threads,
        searches=searches,
    )
    partial.unlink(missing_ok=True)
    text = format_table(table)
    print(text)
    head = (
        f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch threads {args.threads}; "
        f"command: `python benchmarks/quality/encoder/run.py"
        f"{' --methods ' + args.methods if args.methods else ''}"
        f"{' --no-pairs' if args.no_pairs else ''}"
        f"{' --no-search' if args.no_search else ''}`; "
        f"expert fine-tuning {table.seconds['experts']:.0f} s (0 when cached), "
        f"total {table.seconds['total']:.0f} s.\n\n"
    )
    args.out.write_text(head + text + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "tasks": table.tasks,
                "expert_acc": table.expert_acc,
                "rows": [r.__dict__ for r in table.rows],
                "seconds": table.seconds,
                "test_reads": table.test_reads,
                "grids": grids,
                "pair_grids": pairs,
                "searches": SEARCH_SPACES if searches else {},
                "train": train.__dict__,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
