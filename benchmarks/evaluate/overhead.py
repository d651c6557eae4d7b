"""Per-call overhead of repeated ``alloykit.evaluate`` with new weights (the recipe-search loop).

Builds a toy Llama family (``--hidden``/``--layers``/``--vocab``), a 16-row multiple-choice task,
and times: the first call (builds the skeleton), later calls with a new state dict each (weights
copied into the kept skeleton), the scoring alone, and, for contrast, ``from_pretrained`` of a
model folder (what rebuilding per candidate would cost at least).

    PYTHONPATH=src .venv/bin/python benchmarks/evaluate/overhead.py --hidden 512 --layers 8
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
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from alloykit.evaluation import EvalOptions, evaluate, score
    from alloykit.evaluation.model import _read_state
    from alloykit.toymodels import ToySpec, make_family

    root = Path(tempfile.mkdtemp(prefix="alloykit-eval-bench-"))
    spec = ToySpec(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    family = make_family(root / "models", spec, finetunes=2)
    rows = [
        {"q": f"w{i} w{i + 1} w{i + 2}", "options": [f"w{i + 3}", f"w{i + 9}"], "answer": i % 2}
        for i in range(16)
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = root / "mc.yml"
    task.write_text(
        "data: mc.jsonl\nprompt: '{{ q }}'\nchoices: options\ntarget: answer\nmetric: multiple_choice\n"
    )
    options = EvalOptions(device=args.device)
    parameters = sum(t.numel() for t in _read_state(family["base"]).values())
    states = [_read_state(family[name]) for name in ("ft1", "ft2")]

    started = time.perf_counter()
    evaluate(states[0], task, options, like=family["base"])
    first = time.perf_counter() - started
    skeleton = score._SKELETON[0]

    calls, scoring, copies = [], [], []
    for i in range(args.repeat):
        state = states[i % 2]
        started = time.perf_counter()
        evaluate(state, task, options, like=family["base"])
        calls.append(time.perf_counter() - started)
        started = time.perf_counter()
        skeleton.model.load_state_dict(state, strict=False)
        copies.append(time.perf_counter() - started)
        started = time.perf_counter()
        score.score_task(skeleton, score.get_task(task), options)
        scoring.append(time.perf_counter() - started)
    from transformers import AutoModelForCausalLM

    rebuilds = []
    for _ in range(3):
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(family["ft1"]).to(args.device)
        rebuilds.append(time.perf_counter() - started)
    median = statistics.median
    print(f"model: {parameters / 1e6:.2f}M parameters, torch threads {torch.get_num_threads()}")
    print(f"first call (build skeleton, tokenise, score): {first:.3f} s")
    print(f"later call with new weights:                 {median(calls):.3f} s (median)")
    print(f"  of which scoring the task:                 {median(scoring):.3f} s")
    print(f"  per-call overhead (call - scoring):        {median(calls) - median(scoring):.3f} s")
    print(f"  load_state_dict copy alone:                {median(copies):.3f} s")
    print(f"from_pretrained per candidate (contrast):    {median(rebuilds):.3f} s")


if __name__ == "__main__":
    main()
