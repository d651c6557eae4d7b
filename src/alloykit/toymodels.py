"""Small, deterministic Hugging Face checkpoints: a base model and fine-tunes of it.

Used by ``alloykit example``, the tests and the golden-reference script. The architecture and
the file layout come from ``transformers`` (a config, ``save_pretrained``, a real fast
tokenizer); the values come from NumPy's PCG64 generator seeded by a stable hash of
(seed, model, tensor name), so every tensor is the same on every machine, whatever the torch
version, thread count or generation order.

Architectures (``ToySpec.model_type``): ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma3_text``
(Gemma3ForCausalLM, with a mix of sliding and full attention layers), ``gpt2`` (GPT2LMHeadModel)
and ``bert`` (a plain ``BertModel``, no head). The spec's sizes are passed under each config's own
keyword names (``n_embd``/``n_layer``/``n_head`` for GPT-2), so one spec describes them all.

A fine-tune is ``base + shared + own + sparse``: a small delta common to all fine-tunes, a
smaller one of its own, and a few larger changes on 2% of the entries, which is roughly the
shape of real fine-tuning deltas (see ``../shared/bench/make_models.py`` for the same idea at
benchmark sizes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIGMA = 0.02  # Llama's initialiser std: the scale of base weights


@dataclass(frozen=True)
class ToySpec:
    """Shape of a toy model (defaults: a ~60k-parameter Llama that loads in milliseconds).

    ``num_key_value_heads`` is ignored by architectures without grouped-query attention
    (``gpt2``, ``bert``); ``tie_word_embeddings`` by those without an LM head (``bert``).
    """

    vocab_size: int = 128
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    model_type: str = "llama"  # one of MODEL_TYPES


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "bert")
# Architectures without a causal-LM head: built and saved as their bare ``AutoModel``.
_ENCODERS = ("bert",)


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(k) for k in key).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _config_kwargs(spec: ToySpec) -> dict[str, object]:
    """The spec as keyword arguments of ``spec.model_type``'s config class."""
    if spec.model_type not in MODEL_TYPES:
        raise ValueError(f"unknown toy model_type {spec.model_type!r}; one of {MODEL_TYPES}")
    if spec.model_type == "gpt2":
        return dict(
            vocab_size=spec.vocab_size,
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_hidden_layers,
            n_head=spec.num_attention_heads,
            n_positions=128,
            tie_word_embeddings=spec.tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
        )
    if spec.model_type == "bert":
        return dict(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            max_position_embeddings=128,
            type_vocab_size=2,
            pad_token_id=0,
        )
    kwargs: dict[str, object] = dict(  # llama, mistral, qwen2, qwen3
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=128,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
    )
    if spec.model_type == "qwen3":  # Qwen3's default head_dim (128) does not fit a tiny model
        kwargs.update(head_dim=spec.hidden_size // spec.num_attention_heads)
    if spec.model_type == "gemma3_text":
        # Gemma's defaults (head_dim 256, a full-attention layer every 6th) do not fit a tiny
        # model; every 3rd layer is full attention here, so a 4-layer model has both kinds in
        # an order that a sliced model's per-layer ``layer_types`` must follow.
        kwargs.update(
            head_dim=spec.hidden_size // spec.num_attention_heads,
            sliding_window=16,
            layer_types=[
                "full_attention" if i % 3 == 2 else "sliding_attention"
                for i in range(spec.num_hidden_layers)
            ],
            pad_token_id=0,
        )
    return kwargs


def _config(spec: ToySpec):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    config = AutoConfig.for_model(spec.model_type, **_config_kwargs(spec))
    config.dtype = spec.dtype
    return config


def model_class(spec: ToySpec):  # type: ignore[no-untyped-def]
    """The ``transformers`` Auto class that builds and loads ``spec``'s checkpoints."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if spec.model_type in _ENCODERS else AutoModelForCausalLM


def _empty_model(spec: ToySpec):  # type: ignore[no-untyped-def]
    import torch

    with torch.device("meta"):
        return model_class(spec).from_config(_config(spec))


def parameter_shapes(spec: ToySpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors ``save_pretrained`` writes for ``spec``."""
    model = _empty_model(spec)
    names = {n for n, _ in model.named_parameters()}  # tied parameters appear once
    return {n: tuple(p.shape) for n, p in model.state_dict().items() if n in names}


def _is_norm_gain(name: str) -> bool:
    """True for a normalisation layer's gain: ``*norm.weight``, BERT's ``LayerNorm.weight``,
    GPT-2's ``ln_1.weight``/``ln_f.weight``."""
    leaf = name.rsplit(".", 2)[-2:]
    return name.endswith(("norm.weight", "Norm.weight")) or (
        leaf[-1] == "weight" and leaf[0].startswith("ln_")
    )


def base_values(
    name: str, shape: tuple[int, ...], seed: int, *, model_type: str = "llama"
) -> np.ndarray:
    """The base model's tensor ``name``: N(0, SIGMA), norm gains near 1.

    Gemma stores its RMSNorm gains as offsets from 1 (it scales by ``1 + weight``), so for
    ``gemma3_text`` they stay near 0, like every other tensor.
    """
    values = _rng("base", seed, name).standard_normal(shape).astype(np.float32) * SIGMA
    if _is_norm_gain(name) and not model_type.startswith("gemma"):
        values += 1.0
    return values


def delta_values(name: str, shape: tuple[int, ...], seed: int, index: int) -> np.ndarray:
    """Fine-tune ``index``'s change to tensor ``name`` (float32)."""
    shared = _rng("shared", seed, name).standard_normal(shape).astype(np.float32) * 0.1 * SIGMA
    rng = _rng("finetune", seed, index, name)
    own = rng.standard_normal(shape).astype(np.float32) * 0.05 * SIGMA
    sparse = (rng.random(shape) < 0.02) * rng.standard_normal(shape).astype(np.float32) * SIGMA
    return shared + own + sparse.astype(np.float32)


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A real fast word-level tokenizer with exactly ``vocab_size`` entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def save_checkpoint(
    folder: Path,
    spec: ToySpec,
    tensors: dict[str, np.ndarray],
    *,
    max_shard_size: str | int | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write ``tensors`` as a Hugging Face checkpoint of ``spec`` (config, weights, tokenizer).

    ``max_shard_size`` (e.g. ``"20KB"``) makes ``save_pretrained`` write several shards and a
    ``model.safetensors.index.json``; ``None`` writes one ``model.safetensors``.
    """
    import torch
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    model = _empty_model(spec)
    if spec.model_type not in _ENCODERS:
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    dtype = getattr(torch, spec.dtype)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in tensors.items()}
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    if max_shard_size is None:
        kwargs["max_shard_size"] = "100GB"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(str(folder), state_dict=state, **kwargs)
    if tokenizer:
        _write_tokenizer(folder, spec.vocab_size)
    return folder


def make_family(
    root: str | Path,
    spec: ToySpec | None = None,
    *,
    finetunes: int = 2,
    seed: int = 0,
    max_shard_size: str | int | None = None,
) -> dict[str, Path]:
    """Write ``base`` and ``ft1..ftN`` under ``root``; return ``{name: folder}``.

    Example:
        >>> folders = make_family("/tmp/toy", finetunes=2)  # doctest: +SKIP
        >>> sorted(folders)
        ['base', 'ft1', 'ft2']
    """
    spec = spec or ToySpec()
    root = Path(root)
    shapes = parameter_shapes(spec)
    base = {
        name: base_values(name, shape, seed, model_type=spec.model_type)
        for name, shape in shapes.items()
    }
    folders = {"base": save_checkpoint(root / "base", spec, base, max_shard_size=max_shard_size)}
    for index in range(1, finetunes + 1):
        tensors = {
            name: values + delta_values(name, values.shape, seed, index)
            for name, values in base.items()
        }
        folders[f"ft{index}"] = save_checkpoint(
            root / f"ft{index}", spec, tensors, max_shard_size=max_shard_size
        )
    (root / "family.json").write_text(
        json.dumps({"spec": spec.__dict__, "seed": seed, "finetunes": finetunes}, indent=2)
    )
    return folders


# --------------------------------------------------------------------------- vocabularies

# A few hundred words of plain English: enough for a byte-level BPE to learn ~100 merges.
CORPUS = (
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
    "model merging combines the weights of models fine-tuned from one base model. "
    "a tokenizer splits text into tokens and each token has one row in the embedding. "
    "when two models disagree about their vocabulary the rows must be aligned first. "
    "the merged model should answer questions, follow instructions and write code. "
    "chat models wrap every turn of a conversation in special tokens of their own. "
    "small models train quickly and large models remember more of what they read. "
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def train_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained on :data:`CORPUS` with ``vocab_size`` entries.

    Training is deterministic and greedy, so a larger ``vocab_size`` gives the same first
    entries plus more merges: tokenizers of one family with added tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus yields {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    return tokenizer


def _row(kind: str, *key: object, size: int) -> np.ndarray:
    return _rng(kind, *key).standard_normal(size).astype(np.float32) * SIGMA


def make_vocabulary_family(
    root: str | Path,
    *,
    tokens: int = 96,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> dict[str, Path]:
    """Four tiny Llamas whose vocabularies differ the ways real fine-tunes' do.

    - ``base``: a BPE tokenizer of ``tokens`` entries, one embedding row each;
    - ``chat``: the same tokenizer trained 6 merges further, plus the special tokens
      ``<|im_start|>``/``<|im_end|>`` and a ChatML template (``tokens + 8`` rows);
    - ``padded``: the 6-merges-further tokenizer with its rows padded to ``tokens + 16``;
    - ``short``: the base tokenizer with only ``tokens - 3`` rows (its last 3 entries have no row).

    A token's row is the same in every model up to a small per-model change (as after
    fine-tuning), wherever its id, so rows aligned by token string are related. Other tensors
    are :func:`base_values` plus a per-model :func:`delta_values`.
    """
    from transformers import PreTrainedTokenizerFast

    from alloykit.chat_templates import CHAT_TEMPLATES

    root = Path(root)
    small, large = train_tokenizer(tokens), train_tokenizer(tokens + 6)
    variants = {  # name: (tokenizer, chat tokens, rows)
        "base": (small, False, tokens),
        "chat": (large, True, tokens + 8),
        "padded": (large, False, tokens + 16),
        "short": (small, False, tokens - 3),
    }
    folders = {}
    for index, (name, (trained, chat, rows)) in enumerate(variants.items()):
        spec = ToySpec(
            vocab_size=rows,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=tie_word_embeddings,
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=trained.from_str(trained.to_str()),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
        )
        if chat:
            fast.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
            fast.chat_template = CHAT_TEMPLATES["chatml"]
        by_id = {i: t for t, i in fast.get_vocab().items()}
        tensors = {}
        for tensor, shape in parameter_shapes(spec).items():
            if tensor in ("model.embed_tokens.weight", "lm_head.weight"):
                values = np.stack(
                    [
                        _row("row", seed, tensor, by_id[i], size=shape[1])
                        + 0.1 * _row("tune", seed, name, tensor, by_id[i], size=shape[1])
                        if i in by_id
                        else _row("pad", seed, name, tensor, i, size=shape[1])
                        for i in range(shape[0])
                    ]
                )
            else:
                values = base_values(tensor, shape, seed)
                if index:
                    values = values + delta_values(tensor, shape, seed, index)
            tensors[tensor] = values
        folder = save_checkpoint(root / name, spec, tensors, tokenizer=False)
        fast.save_pretrained(str(folder))
        folders[name] = folder
    return folders
