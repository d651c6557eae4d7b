"""Tensor-name anatomy: which layer a tensor belongs to, and what kind of module it is.

Architectures name their decoder layers differently (``model.layers.3.``, ``transformer.h.3.``,
``bert.encoder.layer.3.``, ``model.language_model.layers.3.``); all share the shape
``<stack prefix><index>.<rest>``. The stack with the most layers is the model's layer stack;
every other tensor is a pre-layer tensor (embeddings) or a post-layer tensor (final norm,
head), which is what MergeKit's slicing and layer fractions need.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

_LAYER = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block)\.)(?P<index>\d+)\.(?P<rest>.+)$"
)
_EMBEDDING_WORDS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings", "shared.weight")
# Keys under which configs give the number of layers, in the order they are tried.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# A model whose head is tied keeps only the embedding; these are the head's usual names.
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")


@dataclass(frozen=True)
class LayerName:
    """A per-layer tensor name split into ``prefix``, layer ``index`` and ``rest``."""

    prefix: str
    index: int
    rest: str

    def renumber(self, index: int) -> str:
        """The same tensor in layer ``index``."""
        return f"{self.prefix}{index}.{self.rest}"


def split_layer_name(name: str) -> LayerName | None:
    """``model.layers.3.mlp.up_proj.weight`` -> LayerName("model.layers.", 3, "mlp.up_proj.weight")."""
    match = _LAYER.match(name)
    if match is None:
        return None
    return LayerName(match["prefix"], int(match["index"]), match["rest"])


def layer_stack_prefix(names: Iterable[str]) -> str | None:
    """The prefix of the model's main layer stack (the one with the most layers), or None."""
    layers_per_prefix: dict[str, set[int]] = {}
    for name in names:
        parts = split_layer_name(name)
        if parts is not None:
            layers_per_prefix.setdefault(parts.prefix, set()).add(parts.index)
    if not layers_per_prefix:
        return None
    return max(layers_per_prefix, key=lambda p: (len(layers_per_prefix[p]), -len(p)))


_OUTER_LAYER = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h|blocks|block)\.)\d+\.")


def layer_stacks(names: Iterable[str]) -> list[str]:
    """The prefixes of every outermost layer stack, in first-seen order.

    A decoder-only model has one (``model.layers.``); an encoder-decoder model has two
    (``model.encoder.layers.``, ``model.decoder.layers.``), a vision-language model one per
    tower (``vision_tower.vision_model.encoder.layers.``, ``language_model.model.layers.``).
    Stacks nested in a layer (T5's ``encoder.block.0.layer.1``) count as their outer stack.
    """
    stacks: dict[str, None] = {}
    for name in names:
        match = _OUTER_LAYER.match(name)
        if match is not None:
            stacks.setdefault(match["prefix"], None)
    return list(stacks)


def tensor_position(name: str, stack_prefix: str | None) -> Literal["pre", "layer", "post"]:
    """Where a tensor sits: before the layer stack (embeddings), in it, or after it (norm, head)."""
    parts = split_layer_name(name)
    if parts is not None and parts.prefix == stack_prefix:
        return "layer"
    lowered = name.lower()
    if parts is not None or any(word in lowered for word in _EMBEDDING_WORDS):
        return "pre"  # other stacks (vision towers) merge with the embeddings, at t = 0
    return "post"


def is_vocabulary_tensor(name: str) -> bool:
    """True for tensors with one row per token (token embeddings and the LM head)."""
    lowered = name.lower()
    return name in HEAD_NAMES or any(
        w in lowered for w in ("embed_tokens", "wte.", "word_embeddings", "tok_embeddings")
    )


MODULE_KINDS = ("embedding", "head", "norm", "attention", "mlp")


def module_kind(name: str) -> str | None:
    """The module kind of a tensor (one of :data:`MODULE_KINDS`), or None when none fits.

    Read from the name alone, for any transformer: ``lm_head``/``embed_out`` are the head;
    token and position embeddings the embedding; ``norm``/``ln_``/``LayerNorm`` a norm;
    ``attn``/``attention``/``q_proj``... attention; ``mlp``/``ffn``/``fc1``/``c_fc``/BERT's
    ``intermediate`` and layer ``output`` the MLP.
    """
    lowered = name.lower()
    parts = split_layer_name(name)
    rest = parts.rest.lower() if parts is not None else lowered
    if name in HEAD_NAMES or lowered.startswith("lm_head."):
        return "head"
    if is_vocabulary_tensor(name) or "embed" in lowered or "wpe." in lowered:
        return "embedding"
    if "norm" in rest or "ln_" in rest or "layernorm" in rest:
        return "norm"
    if any(w in rest for w in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(
        w in rest
        for w in (
            "mlp",
            "ffn",
            "feed_forward",
            "fc1",
            "fc2",
            "c_fc",
            "intermediate",
            "output.dense",
        )
    ):
        return "mlp"
    return None


def layer_count(config: Mapping[str, Any] | None, names: Iterable[str]) -> tuple[int, str | None]:
    """The number of layers and the config key that holds it (None when the config has none).

    The count is read from the config when it has one of :data:`LAYER_COUNT_KEYS` (at the top
    level or under ``text_config``), else counted from the tensor names.
    """
    for section in ("", "text_config"):
        if config is None:
            break
        block = config.get(section) if section else config
        if isinstance(block, Mapping):
            for key in LAYER_COUNT_KEYS:
                if isinstance(block.get(key), int):
                    return block[key], f"{section}.{key}" if section else key
    name_list = list(names)
    prefix = layer_stack_prefix(name_list)
    counts = Counter(
        p.index for n in name_list if (p := split_layer_name(n)) and p.prefix == prefix
    )
    return (max(counts) + 1 if counts else 0), None


def input_embedding_name(names: Iterable[str]) -> str | None:
    """The token-embedding tensor among ``names`` (what a tied head falls back to)."""
    candidates = [n for n in names if is_vocabulary_tensor(n) and n not in HEAD_NAMES]
    return min(candidates, key=len) if candidates else None


def architecture_family(architecture: str) -> str:
    """``BertModel``, ``BertForSequenceClassification`` -> ``Bert``: the backbone's name stem.

    A backbone and the task models built on it share the stem, so a ``BertModel`` base and
    ``BertForSequenceClassification`` fine-tunes are one family (``LlamaForCausalLM`` and
    ``MistralForCausalLM`` are not).
    """
    stem, found, _ = architecture.partition("For")
    return stem if found and stem else architecture.removesuffix("Model")


@functools.cache
def base_model_prefix(model_type: str) -> str | None:
    """transformers' ``base_model_prefix`` for ``model_type`` (``bert`` -> ``bert``), or None.

    A task model (``BertForSequenceClassification``) stores its backbone under this prefix
    while the bare backbone (``BertModel``) stores the same tensors without it. transformers is
    imported only here, and only for merges whose models' tensors differ, because importing it
    takes seconds.
    """
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    class_name = MODEL_MAPPING_NAMES.get(model_type)
    if not isinstance(class_name, str):
        return None
    prefix = getattr(getattr(transformers, class_name, None), "base_model_prefix", None)
    return prefix if isinstance(prefix, str) and prefix else None


def backbone_prefix(config: Mapping[str, Any] | None, names: Iterable[str]) -> str:
    """``"bert."`` for a model that stores its backbone under its ``base_model_prefix``, else ``""``.

    The rule: the model's layer stack starts with ``<base_model_prefix>.``, where the prefix is
    transformers' for the config's ``model_type`` (``bert.encoder.layer.`` in
    ``BertForSequenceClassification``; ``encoder.layer.`` in ``BertModel`` gives ``""``).
    """
    stack = layer_stack_prefix(names) or ""
    model_type = (config or {}).get("model_type")
    first, dot, rest = stack.partition(".")
    if not isinstance(model_type, str) or not dot or not rest:
        return ""  # a one-component stack (``layers.``, ``h.``) is a bare backbone
    prefix = base_model_prefix(model_type)
    return f"{prefix}." if prefix == first else ""
