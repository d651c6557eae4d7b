"""Merge-quality benchmark on a real pretrained encoder (all-MiniLM-L6-v2) and real fine-tunes.

Four text-classification tasks from PyPI-shipped data (alloykit.demo.data), one full
fine-tune per task (cached), every catalogue method merging the experts' backbones, each
merged backbone scored on every task with the task's own head. Hyper-parameters are chosen on
validation from GRIDS below; the test split is read once per reported cell (asserted).

    HF_HUB_OFFLINE=1 python benchmarks/quality/encoder/run.py --cache ~/.cache/alloykit/quality \
        --out benchmarks/quality/encoder/table.md
    python benchmarks/quality/encoder/run.py --experts-only     # fine-tune and cache only
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

# Multi-model methods (all experts at once): the validation grid of each.
GRIDS: dict[str, dict[str, list]] = {
    "linear": {},
    "task_arithmetic": {"lambda": LAMBDA},
    "ties": {"density": [0.1, 0.2, 0.3, 0.5, 0.7], "lambda": [0.7, 1.0, 1.5]},
    "tsv": {"alpha": [0.5, 0.7, 1.0, 1.5]},
    "iso_c": {"alpha": [0.5, 0.7, 1.0, 1.5]},
    "iso_cts": {"alpha": [0.5, 0.7, 1.0, 1.5]},
    "magnitude_prune": {"density": [0.2, 0.5], "lambda": LAMBDA},
    "dare_linear": {"density": [0.3, 0.7], "lambda": LAMBDA},
    "dare_ties": {"density": [0.3, 0.7], "lambda": LAMBDA},
    "della": {"density": [0.3, 0.7], "lambda": [0.7, 1.0, 1.5]},
    "della_linear": {"density": [0.3, 0.7], "lambda": LAMBDA},
    "breadcrumbs": {"density": [0.5, 0.9], "lambda": LAMBDA},
    "breadcrumbs_ties": {"density": [0.5, 0.9], "lambda": LAMBDA},
    "magmax": {"lambda": LAMBDA},
    "consensus": {"lambda": LAMBDA},
    "pcb": {"pcb_ratio": [0.1, 0.2], "lambda": LAMBDA},
    "sce": {"select_topk": [0.1, 0.3, 1.0]},
    "model_stock": {},
    "multislerp": {},
    "karcher": {},
    "ram": {},
    "ramplus_tl": {},
}
# Two-model methods: every pair of experts, the pair with the best validation mean reported.
PAIR_GRIDS: dict[str, dict[str, list]] = {"nuslerp": {}}
# One-model methods (slerp, nearswap, arcee_fusion, expo, passthrough) combine one fine-tune
# with the base: not multi-task merges, so not in the table.


def main() -> None:
    """Run the benchmark and write the table (Markdown) and the raw numbers (JSON)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "src"))
    from alloykit.demo.core import TrainConfig
    from alloykit.demo.experiment import format_table, load_tasks, run_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/alloykit/quality")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("table.md"))
    parser.add_argument("--methods", default="", help="comma-separated subset of GRIDS")
    parser.add_argument("--no-pairs", action="store_true")
    parser.add_argument("--experts-only", action="store_true")
    parser.add_argument("--task", default="", help="with --experts-only: this task only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args()
    train = TrainConfig(steps=args.steps, threads=args.threads)
    if args.experts_only:
        from alloykit.demo.core import base_model_path, clean_base, get_expert
        from alloykit.demo.data import TASK_NAMES

        start = time.perf_counter()
        base = clean_base(args.cache, base_model_path())
        names = [args.task] if args.task else TASK_NAMES
        for task in load_tasks(args.cache, names, 0, 100):
            t0 = time.perf_counter()
            get_expert(args.cache, task, base, train)
            print(f"{task.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"experts: {time.perf_counter() - start:.0f} s")
        return
    wanted = [m for m in args.methods.split(",") if m] or list(GRIDS)
    grids = {m: GRIDS[m] for m in wanted}
    pairs = {} if args.no_pairs else PAIR_GRIDS
    table = run_table(args.cache, grids, pairs, train=train, log=lambda s: print(s, flush=True))
    text = format_table(table)
    print(text)
    head = (
        f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch threads {args.threads}; "
        f"command: `python benchmarks/quality/encoder/run.py"
        f"{' --methods ' + args.methods if args.methods else ''}"
        f"{' --no-pairs' if args.no_pairs else ''}`; "
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
                "train": train.__dict__,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
