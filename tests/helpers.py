"""Helpers shared by tests: reading outputs as float64 arrays, writing YAML, running the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def load_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder as float64 NumPy arrays (bf16 via torch)."""
    import torch
    from safetensors.torch import load_file as load_torch

    tensors: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            tensors.update({k: v.astype(np.float64) for k, v in load_file(file).items()})
        except (TypeError, ValueError):  # bfloat16 has no NumPy dtype
            tensors.update({k: v.to(torch.float64).numpy() for k, v in load_torch(file).items()})
    return tensors


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``alloykit ARGS`` in a subprocess (as a user would) and capture its output."""
    command = [sys.executable, "-m", "alloykit.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)
