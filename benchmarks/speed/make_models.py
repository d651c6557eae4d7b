"""Write the speed benchmark's models: a Llama-shaped base and fine-tunes, streamed to disk.

Sizes (all Llama, untied head, word-level tokenizer of the full vocabulary):

    tiny    2.0M parameters, float32   (smoke runs of the harness)
    small   125M parameters, bfloat16, 100 MB shards
    medium  1.1B parameters, bfloat16, 500 MB shards (TinyLlama's shape; the issue's table)

Values come from :mod:`alloykit.toymodels` (a PCG64 generator seeded by a stable hash of
(model, tensor), so every tensor is the same on any machine): base N(0, 0.02) with norm gains
near 1; each fine-tune adds a shared dense change, its own dense change and a sparse 2% of
larger changes. Tensors are generated and written one shard at a time, so memory stays near
one shard whatever the size.

    python benchmarks/speed/make_models.py --size medium --finetunes 3 --out bench-data/models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from alloykit.toymodels import (
    ToySpec,
    _config,
    _empty_model,
    _write_tokenizer,
    base_values,
    delta_values,
    parameter_shapes,
)

SIZES = {
    "tiny": (ToySpec(2048, 128, 352, 8, 4, 2, dtype="float32"), 3 << 20),
    "small": (ToySpec(32000, 768, 2048, 12, 12, 4, dtype="bfloat16"), 100 << 20),
    "medium": (ToySpec(32000, 2048, 5632, 22, 32, 4, dtype="bfloat16"), 500 << 20),
}
SEED = 0


def write_model(folder: Path, spec: ToySpec, shard_bytes: int, index: int) -> None:
    """Write model ``index`` (0: the base, i: fine-tune i) into ``folder``, shard by shard."""
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, spec.dtype)
    shapes = parameter_shapes(spec)
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and used + size > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    weight_map: dict[str, str] = {}
    for number, names in enumerate(groups, start=1):
        file = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = {}
        for name in names:
            values = base_values(name, shapes[name], SEED)
            if index:
                values += delta_values(name, shapes[name], SEED, index)
            tensors[name] = torch.from_numpy(values).to(dtype)
            weight_map[name] = file
        save_file(tensors, str(partial / file), metadata={"format": "pt"})
    if len(groups) > 1:
        total = sum(
            int(np.prod(s)) * torch.empty((), dtype=dtype).element_size() for s in shapes.values()
        )
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config = _config(spec)
    config.architectures = [type(_empty_model(spec)).__name__]  # MergeKit requires it
    config.save_pretrained(str(partial))
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(str(partial))
    _write_tokenizer(partial, spec.vocab_size)
    partial.rename(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--finetunes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-data/models"))
    args = parser.parse_args()
    spec, shard_bytes = SIZES[args.size]
    root = args.out / args.size
    for index in range(args.finetunes + 1):
        folder = root / ("base" if index == 0 else f"ft{index}")
        if folder.exists():
            continue
        start = time.perf_counter()
        write_model(folder, spec, shard_bytes, index)
        print(f"{folder}: {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
