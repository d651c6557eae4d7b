"""Helpers shared by ``make_golden.py`` and the tests that compare alloykit with MergeKit.

Pure Python + NumPy on purpose: MergeKit is *not* a dependency of alloykit. It was run once,
by ``make_golden.py``, to write ``mergekit_0.1.5.json``; the tests only read that file.

The JSON keeps, for every output tensor of every config, its shape, its float64 L2 norm and the
values at a few deterministic flat indices (``sample_indices``), so a test can rebuild the
same toy inputs (``FAMILY``), run alloykit's merge on the same config (``render``) and compare.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

GOLDEN_JSON = Path(__file__).parent / "mergekit_0.1.5.json"
CONFIG_DIR = Path(__file__).parent / "configs"
PLACEHOLDER = "${MODELS}"

# Exact arguments of the ``alloykit.toymodels.make_family`` call that built the inputs:
#     make_family(root, ToySpec(**FAMILY["spec"]), finetunes=FAMILY["finetunes"],
#                 seed=FAMILY["seed"])
# (the spec is spelled out so that a later change of ToySpec's defaults cannot silently change
# the inputs the golden data was computed from).
FAMILY = dict(
    spec=dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        dtype="float32",
        model_type="llama",
    ),
    finetunes=3,
    seed=0,
)


def sample_indices(tensor_name: str, numel: int, n: int = 16) -> list[int]:
    """Deterministic, sorted, unique flat indices into a tensor of ``numel`` elements.

    The generator is NumPy's PCG64 seeded from the SHA-256 of ``tensor_name``, so the indices
    depend only on the name and size. If ``numel <= n`` every index is returned.
    """
    if numel <= n:
        return list(range(numel))
    digest = hashlib.sha256(tensor_name.encode("utf-8")).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    picked = rng.choice(numel, size=n, replace=False)
    return sorted(int(i) for i in np.unique(picked))


def summarize(tensors: dict[str, np.ndarray]) -> dict:
    """``{name: {"shape", "norm", "sample"}}``: float64 L2 norm and values at ``sample_indices``."""
    out = {}
    for name in sorted(tensors):
        values = np.asarray(tensors[name]).astype(np.float64)
        flat = values.reshape(-1)
        idx = sample_indices(name, flat.size)
        out[name] = {
            "shape": [int(d) for d in values.shape],
            "norm": float(np.sqrt(np.sum(flat * flat))),
            "sample": [float(flat[i]) for i in idx],
        }
    return out


def load_golden() -> dict:
    """The committed MergeKit reference data (see ``make_golden.py`` for its layout)."""
    return json.loads(GOLDEN_JSON.read_text(encoding="utf-8"))


def render(config_text: str, models_root: Path) -> str:
    """Replace ``${MODELS}`` in a config with the absolute path of the toy family's folder."""
    return config_text.replace(PLACEHOLDER, str(Path(models_root).resolve()))


# Merges of models whose vocabularies differ (``tokenizer_source`` / ``tokenizer:``), run on
#     make_vocabulary_family(root, **VOCAB_FAMILY)
# MergeKit numbers the union's new tokens differently from run to run, so vocabulary tensors
# (token embeddings, LM head) are kept row by row under each row's token, and compared after
# pairing rows by token; rows past the vocabulary (padding) are kept in order.
VOCAB_GOLDEN_JSON = Path(__file__).parent / "mergekit_0.1.5_vocab.json"
VOCAB_CONFIG_DIR = Path(__file__).parent / "vocab_configs"
VOCAB_FAMILY = dict(tokens=96, tie_word_embeddings=False, seed=0)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def rows_by_token(
    tensors: dict[str, np.ndarray], vocab: dict[str, int]
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[list[float]]]]:
    """``({tensor: {token: row}}, {tensor: padding rows})`` of the vocabulary tensors."""
    rows: dict[str, dict[str, list[float]]] = {}
    padding: dict[str, list[list[float]]] = {}
    for name in VOCAB_TENSORS:
        if name not in tensors:
            continue
        values = np.asarray(tensors[name], dtype=np.float64)
        rows[name] = {token: [float(x) for x in values[i]] for token, i in sorted(vocab.items())}
        padding[name] = [[float(x) for x in row] for row in values[len(vocab) :]]
    return rows, padding


def load_vocab_golden() -> dict:
    """The committed MergeKit reference data for vocabulary merges."""
    return json.loads(VOCAB_GOLDEN_JSON.read_text(encoding="utf-8"))
