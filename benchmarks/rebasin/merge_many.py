"""MergeMany on scikit-learn's digits: the mean of N MLPs, naive and aligned.

N MLPs (the architecture of ``run.py``) are trained from different seeds; their plain average
is compared with the MergeMany average (Ainsworth et al. 2023, arXiv:2209.04836, Algorithm 3),
written by ``alloykit align --merge-many``, and with REPAIR (Jordan et al. 2023,
arXiv:2211.08403) on the training images.

Run (a few minutes on a shared two-core CPU machine):

    PYTHONPATH=src .venv/bin/python benchmarks/rebasin/merge_many.py

Writes ``benchmarks/rebasin/merge_many.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from alloykit.rebasin.matching import mean_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, build, digits, evaluate, train


def merge_with_cli(
    models: list[torch.nn.Module], x_calibration: torch.Tensor, repaired: bool
) -> torch.nn.Module:
    """The ``alloykit align --merge-many`` output, optionally REPAIRed, loaded into the MLP."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = []
        for i, model in enumerate(models):
            paths.append(str(root / f"m{i}.pt"))
            torch.save(model.state_dict(), paths[-1])
        command = [sys.executable, "-m", "alloykit.cli", "align", "--merge-many", *paths]
        command.append(str(root / "merged"))
        if repaired:
            torch.save(x_calibration, root / "x.pt")
            module = f"{Path(__file__).resolve().parent / 'run.py'}:build"
            command += ["--calibration", str(root / "x.pt"), "--module", module, "--repair"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        print(done.stdout.strip())
        merged = build()
        merged.load_state_dict(load_file(root / "merged" / "model.safetensors"))
    return merged.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4, help="how many MLPs to merge")
    parser.add_argument("--out", type=Path, default=HERE, help="where merge_many.md goes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = digits()
    models = [train(seed, x_train, y_train) for seed in range(1, args.models + 1)]
    naive = build()
    naive.load_state_dict(
        {k: v.float() for k, v in mean_state([m.state_dict() for m in models]).items()}
    )
    rows = [(f"model {i + 1}", *evaluate(m, x_test, y_test)) for i, m in enumerate(models)]
    rows.append(("naive mean", *evaluate(naive.eval(), x_test, y_test)))
    rows.append(
        ("MergeMany mean", *evaluate(merge_with_cli(models, x_train, False), x_test, y_test))
    )
    rows.append(
        ("MergeMany + REPAIR", *evaluate(merge_with_cli(models, x_train, True), x_test, y_test))
    )
    lines = [
        f"# MergeMany on scikit-learn digits: the mean of {args.models} MLPs",
        "",
        "Produced by `PYTHONPATH=src .venv/bin/python benchmarks/rebasin/merge_many.py` "
        "(architecture and training as in run.py; test split 360 images).",
        "",
        "| model | test loss | test accuracy |",
        "|---|---|---|",
        *[f"| {name} | {loss:.4f} | {accuracy:.3f} |" for name, loss, accuracy in rows],
    ]
    (args.out / "merge_many.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    main()
