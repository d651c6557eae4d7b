"""Regenerate the MergeKit golden reference data (``tests/golden/mergekit_0.1.5.json``).

MergeKit is not a dependency of alloykit: install it in a separate environment and point this
script at its ``mergekit-yaml`` command. From the repository root::

    .venv/bin/python tests/golden/make_golden.py --mergekit /work/mk/bin/mergekit-yaml

The script builds the toy family described by ``_golden.FAMILY`` with
``alloykit.toymodels.make_family``, renders every ``configs/*.yml`` (``${MODELS}`` -> the
family folder), runs ``mergekit-yaml CONFIG OUT --random-seed 42`` on it, reads every output
tensor with ``safetensors.numpy`` (BF16 outputs via ``safetensors.torch``, widened to
float32 exactly) and writes, per config, ``_golden.summarize`` of the output
(shape, float64 norm and 16 sampled values per tensor), the tensor count, the config text with
the placeholder and MergeKit's stderr lines (warnings; progress bars removed). ``--only NAME`` (repeatable) reruns some configs
and keeps the others from the existing JSON.

A config holding more than one YAML document is a multi-stage recipe: it is run with the
``mergekit-multi`` next to ``--mergekit`` (``mergekit-multi CONFIG -I TMPDIR --out-path OUT
--random-seed 42``). Documents with a ``name`` are intermediate stages (written to
``TMPDIR/NAME``; a later document refers to one by using that name as a model path); the
unnamed document is the final output, which is the only one summarised.

``--vocabulary`` runs ``vocab_configs/*.yml`` instead, on the models of
``alloykit.toymodels.make_vocabulary_family`` (``_golden.VOCAB_FAMILY``), whose vocabularies
differ, and writes ``mergekit_0.1.5_vocab.json``: the output's vocabulary size and tokens, the
rows of the token embeddings and LM head keyed by token (MergeKit's ids for new tokens change
from run to run), the padding rows, and the usual summary of every other tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _golden import (  # noqa: E402
    CONFIG_DIR,
    FAMILY,
    GOLDEN_JSON,
    VOCAB_CONFIG_DIR,
    VOCAB_FAMILY,
    VOCAB_GOLDEN_JSON,
    VOCAB_TENSORS,
    render,
    rows_by_token,
    summarize,
)

MERGEKIT_VERSION = "0.1.5"


def _load_safetensors(file: Path) -> dict:
    """``safetensors.numpy.load_file``, except that BF16 files (NumPy has no bfloat16) are read
    with ``safetensors.torch`` and widened to float32, which is exact."""
    import struct

    raw = file.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    if not any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
        from safetensors.numpy import load_file

        return load_file(str(file))
    import torch
    from safetensors.torch import load_file as load_torch

    return {
        name: (value.to(torch.float32) if value.dtype == torch.bfloat16 else value).numpy()
        for name, value in load_torch(str(file)).items()
    }


def load_output(folder: Path) -> dict:
    tensors: dict = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no safetensors output in {folder}")
    for file in files:
        for name, value in _load_safetensors(file).items():
            if name in tensors:
                raise RuntimeError(f"tensor {name} appears twice in {folder}")
            tensors[name] = value
    return tensors


def warning_lines(stderr: str) -> list[str]:
    """MergeKit's stderr without progress bars, duplicates or traceback noise (short)."""
    keep: list[str] = []
    for line in stderr.replace("\r", "\n").splitlines():
        text = line.strip()
        if not text or "it/s]" in text or "s/it]" in text or "%|" in text:
            continue
        if text not in keep:
            keep.append(text[:300])
    return keep[:20]


def run_config(mergekit: str, config: Path, models: Path, work: Path) -> dict:
    text = config.read_text(encoding="utf-8")
    rendered = work / config.name
    rendered.write_text(render(text, models), encoding="utf-8")
    out = work / f"out-{config.stem}"
    cmd = [mergekit, str(rendered), str(out), "--random-seed", "42", "--quiet"]
    if len([doc for doc in yaml.safe_load_all(text) if doc is not None]) > 1:
        intermediate = work / f"stages-{config.stem}"
        cmd = [str(Path(mergekit).with_name("mergekit-multi")), str(rendered)]
        cmd += ["-I", str(intermediate), "--out-path", str(out), "--random-seed", "42", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{config.name}: {Path(cmd[0]).name} failed ({proc.returncode})\n{proc.stderr[-4000:]}"
        )
    tensors = load_output(out)
    out_config = json.loads((out / "config.json").read_text())
    return {
        "config": text,
        "num_tensors": len(tensors),
        "num_hidden_layers": out_config.get("num_hidden_layers"),
        "warnings": warning_lines(proc.stderr),
        "tensors": summarize(tensors),
    }


def run_vocab_config(mergekit: str, config: Path, models: Path, work: Path) -> dict:
    """One vocabulary merge: rows keyed by token, padding rows, other tensors summarised."""
    from tokenizers import Tokenizer

    entry = run_config(mergekit, config, models, work)
    out = work / f"out-{config.stem}"
    tensors = load_output(out)
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    rows, padding = rows_by_token(tensors, vocab)
    entry["vocab_size"] = json.loads((out / "config.json").read_text())["vocab_size"]
    entry["tokens"] = sorted(vocab)
    entry["rows"] = rows
    entry["padding"] = padding
    entry["tensors"] = {k: v for k, v in entry["tensors"].items() if k not in VOCAB_TENSORS}
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", required=True, help="path of MergeKit's mergekit-yaml")
    parser.add_argument("--only", action="append", default=[], help="config stem(s) to rerun")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--vocabulary", action="store_true", help="run vocab_configs/ (differing vocabularies)"
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = VOCAB_GOLDEN_JSON if args.vocabulary else GOLDEN_JSON

    from alloykit.toymodels import ToySpec, make_family, make_vocabulary_family

    version = subprocess.run(
        [
            str(Path(args.mergekit).with_name("python")),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if version and version != MERGEKIT_VERSION:
        raise SystemExit(f"expected MergeKit {MERGEKIT_VERSION}, found {version}")

    configs = sorted((VOCAB_CONFIG_DIR if args.vocabulary else CONFIG_DIR).glob("*.yml"))
    if args.only:
        configs = [c for c in configs if c.stem in set(args.only)]
    family = VOCAB_FAMILY if args.vocabulary else FAMILY
    golden = {"mergekit_version": MERGEKIT_VERSION, "family": family, "configs": {}}
    if args.only and args.output.exists():
        golden["configs"] = json.loads(args.output.read_text())["configs"]

    spec = ToySpec(**FAMILY["spec"])
    failures = []
    with tempfile.TemporaryDirectory(prefix="alloykit-golden-") as tmp:
        work = Path(tmp)
        models = work / "models"
        if args.vocabulary:
            make_vocabulary_family(models, **VOCAB_FAMILY)  # type: ignore[arg-type]
        else:
            make_family(models, spec, finetunes=FAMILY["finetunes"], seed=FAMILY["seed"])
        run = run_vocab_config if args.vocabulary else run_config
        for config in configs:
            print(f"{config.stem} ...", end=" ", flush=True)
            try:
                golden["configs"][config.stem] = run(args.mergekit, config, models, work)
            except RuntimeError as exc:
                print("FAILED")
                failures.append(str(exc))
                continue
            entry = golden["configs"][config.stem]
            print(f"{entry['num_tensors']} tensors, {len(entry['warnings'])} warning line(s)")

    golden["configs"] = dict(sorted(golden["configs"].items()))
    args.output.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
