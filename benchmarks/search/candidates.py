"""Candidates per minute of ``alloykit search``: merge in memory, load into the kept model, score.

Builds a toy Llama family (``--hidden``/``--layers``/``--vocab``), a multiple-choice task with
validation and test splits (``--rows`` rows each), and a search over the two task-vector weights
and (for ``--method ties``) the TIES densities of a template. Runs ``--budget`` candidates with each optimiser in
``--optimisers`` and prints, per optimiser, candidates per minute (as the search reports it:
candidates over the seconds spent merging and scoring them) and the wall time, then splits one
candidate's time into merging and scoring.

    PYTHONPATH=src .venv/bin/python benchmarks/search/candidates.py --hidden 512 --layers 8

``--no-cache`` turns off the task-vector cache (every candidate reads the fine-tunes and
subtracts the base again), for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--optimisers", default="random,tpe,cmaes", help="'none': no search")
    parser.add_argument("--repeats", type=int, default=7, help="merges timed per variant")
    parser.add_argument("--method", default="ties", choices=["ties", "task_arithmetic"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="merge every candidate from the checkpoints (no task-vector cache), for comparison",
    )
    args = parser.parse_args()

    from alloykit.pipeline import MergeOptions, merge_in_memory
    from alloykit.search import SearchOptions, load_search, run_search
    from alloykit.search.objective import Objective
    from alloykit.search.study import _objective
    from alloykit.toymodels import ToySpec, make_family

    root = Path(tempfile.mkdtemp(prefix="alloykit-search-bench-"))
    spec = ToySpec(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    family = make_family(root / "models", spec, finetunes=2)
    for split, offset in (("validation", 0), ("test", 1000)):
        rows = [
            {
                "q": f"w{(i + offset) % 900} w{(i + offset + 1) % 900} w{(i + offset + 2) % 900}",
                "options": [f"w{(i + 3) % 900}", f"w{(i + 9) % 900}"],
                "answer": i % 2,
            }
            for i in range(args.rows)
        ]
        (root / f"mc_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yml").write_text(
        "data: {validation: mc_validation.jsonl, test: mc_test.jsonl}\nprompt: '{{ q }}'\n"
        "choices: options\ntarget: answer\nmetric: multiple_choice\n"
    )
    density = ", density: 0.5" if args.method == "ties" else ""
    (root / "template.yml").write_text(
        f"merge_method: {args.method}\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0{density}}}\n"
        f"  - model: {family['ft2']}\n    parameters: {{weight: 1.0{density}}}\n"
    )
    parameters = (args.vocab * args.hidden * 2) + args.layers * 12 * args.hidden * args.hidden
    print(
        f"toy Llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} "
        f"(~{parameters / 1e6:.1f}M parameters); {args.rows} validation rows, 2 choices each"
    )
    skip = args.optimisers == "none"  # only the timed merges (their search file is written)
    for name in ["random"] if skip else args.optimisers.split(","):
        search_file = root / f"search_{name}.yml"
        search_file.write_text(
            "template: template.yml\nspace:\n"
            "  - {param: 'models[*].parameters.weight', low: 0.0, high: 2.0}\n"
            + (
                "  - {param: 'models[*].parameters.density', low: 0.2, high: 1.0}\n"
                if args.method == "ties"
                else ""
            )
            + "objective: {tasks: [{task: mc.yml}]}\n"
            f"optimiser: {{name: {name}, budget: {args.budget}, seed: 0, popsize: 6}}\n"
        )
        if skip:
            break
        started = time.perf_counter()
        result = run_search(
            search_file,
            root / f"out_{name}",
            SearchOptions(
                device=args.device, threads=args.threads, cache_task_vectors=not args.no_cache
            ),
        )
        wall = time.perf_counter() - started
        seconds = [t.seconds for t in result.trials]
        print(
            f"{name:7s} {len(result.trials)} candidates: {result.candidates_per_minute:7.1f} "
            f"candidates/minute; first {seconds[0]:.2f} s (builds the model), later median "
            f"{statistics.median(seconds[1:]):.3f} s; wall {wall:.1f} s (with imports of the "
            "optimiser, the study in SQLite and the test split)"
        )

    search = load_search(root / "search_random.yml")
    objective: Objective = _objective(search, SearchOptions(device=args.device))
    config = search.space.config(dict.fromkeys(search.space.names, 0.5))
    from alloykit.search.cache import TaskVectorCache

    cache = TaskVectorCache(root / "task_vectors")
    merge_options = MergeOptions(device=args.device, seed=0, threads=args.threads)
    started = time.perf_counter()
    merge_in_memory(config, merge_options, task_vectors=cache)  # writes the cache
    first = time.perf_counter() - started
    merges, cached, scores = [], [], []
    cpu_merges, cpu_cached = [], []
    for seed in range(args.repeats):  # interleaved, so that the machine's load hits both alike
        merge_options = MergeOptions(device=args.device, seed=seed, threads=args.threads)
        started, cpu = time.perf_counter(), time.process_time()
        merged = merge_in_memory(config, merge_options)
        middle = time.perf_counter()
        cpu_merges.append(time.process_time() - cpu)
        objective.score(merged)
        merges.append(middle - started)
        scores.append(time.perf_counter() - middle)
        started, cpu = time.perf_counter(), time.process_time()
        merge_in_memory(config, merge_options, task_vectors=cache)
        cached.append(time.perf_counter() - started)
        cpu_cached.append(time.process_time() - cpu)
    median = statistics.median
    print(
        f"one candidate (median of {args.repeats}): merge in memory {median(merges):.3f} s "
        f"({median(cpu_merges):.3f} s CPU) from the checkpoints, {median(cached):.3f} s "
        f"({median(cpu_cached):.3f} s CPU) from the task-vector cache (written once in "
        f"{first:.3f} s, with that candidate's merge); load + score {median(scores):.3f} s"
    )
    cache.remove()


if __name__ == "__main__":
    main()
