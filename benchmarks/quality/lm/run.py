"""Causal-LM skill-merge benchmark: SmolLM2-135M-Instruct, mathematics-dataset skill experts.

One full fine-tune and one LoRA fine-tune per skill (cached), every method of METHODS merging
the experts (full; LoRA as dense updates and as adapters through ``alloykit lora merge``),
scored by exact match on each skill's held-out test questions; parameters are chosen on
validation. Writes Markdown tables and the raw numbers (JSON).

    python benchmarks/quality/lm/run.py                      # the small configuration
    python benchmarks/quality/lm/run.py --config full        # 300 steps x 16, more data
    python benchmarks/quality/lm/run.py --experts-only       # fine-tune and cache only
    python benchmarks/quality/lm/run.py --methods task_arithmetic,ties --kinds full
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

LAMBDA = [0.5, 1.0]
# Methods merging all experts at once, and the validation grid of each (kept small: every
# grid point costs one in-memory merge and one generation pass over the validation split).
METHODS: dict[str, dict[str, list]] = {
    "linear": {},
    "task_arithmetic": {"lambda": LAMBDA},
    "ties": {"density": [0.2, 0.5], "lambda": [1.0]},
    "dare_ties": {"density": [0.5], "lambda": [1.0]},
    "dare_linear": {"density": [0.5], "lambda": [0.5, 1.0]},
    "breadcrumbs": {"density": [0.5], "gamma": [0.01], "lambda": [1.0]},
    "della": {"density": [0.5], "epsilon": [0.15], "lambda": [1.0]},
    "model_stock": {},
    "tsv": {"alpha": [1.0]},
}
# Recipe search rows: TPE over a method's parameters and one weight per expert, on the
# validation splits only (the best point is scored on test once).
SEARCH_RANGES: dict[str, dict] = {
    "ties": {"ranges": {"density": (0.1, 1.0), "lambda": (0.5, 2.0)}, "weights": (0.2, 1.5)},
    "task_arithmetic": {"ranges": {"lambda": (0.3, 1.5)}, "weights": (0.2, 1.5)},
}
# Training and data sizes: "small" is the configuration meant to finish on a 2-core CPU
# (benchmarks/RESULTS.md has its measured time per step); "full" is the larger one.
PRESETS: dict[str, dict] = {
    "small": {"steps": 40, "batch_size": 8, "sizes": (1000, 100, 100)},
    "full": {"steps": 300, "batch_size": 16, "sizes": (5000, 200, 500)},
}


def main() -> None:
    """Train or reuse the experts, build the tables, write them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "src"))
    from alloykit.demo.experiment import RecipeSearch
    from alloykit.demo.lm.base import base_model
    from alloykit.demo.lm.data import DEFAULT_MODULES, build_skills, write_tasks
    from alloykit.demo.lm.experiment import Scorer, format_table, run_table
    from alloykit.demo.lm.train import TrainConfig, get_expert

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/alloykit/lm")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("table.md"))
    parser.add_argument("--modules", default=",".join(DEFAULT_MODULES))
    parser.add_argument("--methods", default="", help="comma-separated subset of METHODS")
    parser.add_argument(
        "--kinds", default="full,lora", help="experts to train and merge: full, lora or both"
    )
    parser.add_argument("--experts-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-lora", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the experts")
    parser.add_argument(
        "--searches", default="ties", help="comma-separated SEARCH_RANGES rows ('' for none)"
    )
    parser.add_argument("--trials", type=int, default=12, help="TPE trials per search")
    parser.add_argument("--fewshot", type=int, default=3, help="shots of the few-shot base row")
    args = parser.parse_args()
    preset = PRESETS[args.config]
    args.steps = args.steps or preset["steps"]
    args.batch_size = args.batch_size or preset["batch_size"]
    log = lambda text: print(text, flush=True)  # noqa: E731
    started = time.perf_counter()
    modules = [m for m in args.modules.split(",") if m]
    skills = build_skills(modules, preset["sizes"])
    tasks = write_tasks(skills, args.cache / f"tasks-{args.config}")
    shot_tasks = write_tasks(skills, args.cache / f"tasks-{args.config}", fewshot=args.fewshot)
    base = base_model(args.cache)
    kinds = [k for k in args.kinds.split(",") if k]
    configs = {
        "full": TrainConfig(
            "full", args.steps, args.batch_size, args.lr_full, threads=args.threads
        ),
        "lora": TrainConfig(
            "lora",
            args.steps,
            args.batch_size,
            args.lr_lora,
            threads=args.threads,
            lora_rank=args.rank,
            lora_alpha=2 * args.rank,
        ),
    }
    experts: dict[str, dict[str, Path]] = {kind: {} for kind in kinds}
    timing: dict[str, dict] = {}
    for kind in kinds:
        for skill in skills:
            folder = get_expert(args.cache, base, skill.module, skill.train, configs[kind], log)
            experts[kind][skill.module] = folder
            timing[f"{kind}:{skill.module}"] = json.loads((folder / "train.json").read_text())[
                "timing"
            ]
            log(f"{kind} {skill.module}: {folder}")
    if args.experts_only:
        return
    wanted = [m for m in args.methods.split(",") if m] or list(METHODS)
    methods = {m: METHODS[m] for m in wanted}
    searches = {
        name: RecipeSearch(
            name,
            SEARCH_RANGES[name]["ranges"],
            weights=SEARCH_RANGES[name]["weights"],
            trials=args.trials,
        )
        for name in args.searches.split(",")
        if name
    }
    sections = []
    raw = {}
    for kind in kinds:
        # one scorer (test reads counted per table) and score file per kind, so a full and a
        # LoRA table can also run side by side in two processes
        scorer = Scorer(tasks, args.cache / f"scores-{args.config}-{kind}.json", args.threads)
        shots = Scorer(
            shot_tasks, args.cache / f"scores-{args.config}-{kind}-shots.json", args.threads
        )
        rows, own = run_table(
            scorer,
            base,
            {s: f / "model" for s, f in experts[kind].items()},
            methods,
            adapters={s: f / "adapter" for s, f in experts[kind].items()}
            if kind == "lora"
            else None,
            cache=args.cache,
            rank=args.rank * len(modules),
            fewshot=(f"base ({args.fewshot}-shot)", shots) if args.fewshot else None,
            searches=searches,
            log=log,
        )
        title = "Full fine-tunes" if kind == "full" else "LoRA fine-tunes"
        sections.append(f"### {title}\n\n{format_table(rows, own)}\n")
        raw[kind] = {"own": own, "rows": [r.__dict__ for r in rows]}
    per_step = {k: round(v["seconds_per_step"], 1) for k, v in timing.items()}
    head = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}; "
        f"configuration {args.config}, {preset['sizes']} train/validation/test questions; "
        f"training: {args.steps} steps x batch {args.batch_size}, lr {args.lr_full} (full) / "
        f"{args.lr_lora} (LoRA rank {args.rank}); seconds per step: {per_step}; "
        f"total {time.perf_counter() - started:.0f} s.\n\n"
    )
    text = head + "\n".join(sections)
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"raw": raw, "timing": timing, "methods": methods}, indent=1)
    )


if __name__ == "__main__":
    main()
