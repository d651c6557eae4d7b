"""Tiny models with known outputs, and task files, for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alloykit.toymodels import ToySpec, base_values, parameter_shapes, save_checkpoint

VOCAB = 32  # tokens: <unk> <s> </s> w0 .. w28; "wN" has id N + 3
GPT2 = ToySpec(model_type="gpt2", vocab_size=VOCAB, num_hidden_layers=2)


def token(name: str) -> int:
    """The id of word ``wN`` in the toy tokenizer."""
    return int(name[1:]) + 3


def constant_model(folder: Path, logits: np.ndarray) -> Path:
    """A GPT-2 whose logits are ``logits`` at every position, whatever the input.

    The final layer norm has gain 0 and bias e_0, so every hidden state becomes e_0, and the
    LM head's column 0 holds the logits.
    """
    tensors = {
        n: base_values(n, s, 0, model_type="gpt2") for n, s in parameter_shapes(GPT2).items()
    }
    tensors["transformer.ln_f.weight"] = np.zeros_like(tensors["transformer.ln_f.weight"])
    bias = np.zeros_like(tensors["transformer.ln_f.bias"])
    bias[0] = 1.0
    tensors["transformer.ln_f.bias"] = bias
    head = np.zeros_like(tensors["lm_head.weight"])
    head[:, 0] = logits
    tensors["lm_head.weight"] = head
    return save_checkpoint(folder, GPT2, tensors)


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_task(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
