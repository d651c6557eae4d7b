"""Constructed checkpoints with known task vectors, for the diagnostics tests.

``base`` is the toy Llama base; ``ft`` adds a task vector ``δ`` scaled so that every tensor's
``‖δ‖ / ‖base‖`` is exactly ``RELATIVE``; ``same`` adds the same ``δ``, ``negated`` adds ``−δ``,
``small`` adds ``SMALL·δ₂`` (another direction, a much smaller norm), ``zero`` is the base
itself, ``foreign`` is an independently drawn model of the same architecture, and ``partly``
adds ``δ`` except in the MLP of layers 1-2, where it adds ``−δ``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alloykit.toymodels import ToySpec, base_values, parameter_shapes, save_checkpoint

RELATIVE = 0.1
SMALL = 0.005
SPEC = ToySpec(num_hidden_layers=3)
NAMES = ("base", "ft", "same", "negated", "small", "zero", "foreign", "partly")
CONFLICTING = ("model.layers.1.mlp.", "model.layers.2.mlp.")  # where ``partly`` negates δ


def direction(name: str, shape: tuple[int, ...], seed: int, base: np.ndarray) -> np.ndarray:
    """A random task vector for tensor ``name`` with norm ``RELATIVE·‖base‖`` (float32)."""
    rng = np.random.default_rng([seed, sum(name.encode())])
    values = rng.standard_normal(shape)
    return (values * (RELATIVE * np.linalg.norm(base) / np.linalg.norm(values))).astype(np.float32)


def tensors_of(spec: ToySpec = SPEC) -> dict[str, dict[str, np.ndarray]]:
    """Every constructed model's tensors, float32, by model name."""
    shapes = parameter_shapes(spec)
    base = {n: base_values(n, s, 0) for n, s in shapes.items()}
    delta = {n: direction(n, s, 1, base[n]) for n, s in shapes.items()}
    other = {n: direction(n, s, 2, base[n]) for n, s in shapes.items()}
    return {
        "base": base,
        "ft": {n: base[n] + delta[n] for n in shapes},
        "same": {n: base[n] + delta[n] for n in shapes},
        "negated": {n: base[n] - delta[n] for n in shapes},
        "small": {n: base[n] + np.float32(SMALL / RELATIVE) * other[n] for n in shapes},
        "zero": dict(base),
        "foreign": {n: base_values(n, s, 99) for n, s in shapes.items()},
        "partly": {
            n: base[n] - delta[n] if n.startswith(CONFLICTING) else base[n] + delta[n]
            for n in shapes
        },
    }


def write_models(root: Path, names: tuple[str, ...] = NAMES) -> dict[str, Path]:
    """Write the named constructed models under ``root`` (no tokenizer); ``{name: folder}``."""
    models = tensors_of()
    return {
        name: save_checkpoint(root / name, SPEC, models[name], tokenizer=False) for name in names
    }
