"""Permutation specs inferred from tensor names and shapes (and config.json when there is one).

Two kinds of model are recognised:

* **Transformers** (a layer stack such as ``model.layers.N.``) in the Llama/Mistral/Qwen/Gemma,
  GPT-2, BERT and OPT/CLIP/ViT (``fc1``/``fc2``, ``out_proj``) layouts: per layer, one group
  for the MLP's hidden units (rows of the up/gate projections, columns of the down projection)
  and one for the attention heads as whole units (q/k/v rows and the output projection's
  columns, in blocks of ``head_dim``; with grouped-query attention a unit is one key/value head
  and the query heads that share it). Heads need the head count from config.json; without one
  only the MLPs are permuted. The residual stream is left in place, so embeddings, norms and the
  head are unchanged.
* **Sequential networks** (MLPs and plain CNNs): the modules with a weight of two or more
  dimensions (Linear, Conv) are taken in natural name order (``layers.2`` before ``layers.10``),
  each one's outputs but the last's forming a group; a norm (BatchNorm, LayerNorm, GroupNorm:
  a 1-D weight) joins the layer it follows, matched by its trailing number (``bn1`` ->
  ``conv1``) or else by name order (``features.1`` -> ``features.0``). A linear layer after a
  convolution may take the flattened channels (``in = channels x spatial``).

Anything else (residual CNNs, custom blocks) needs a YAML spec (:func:`~alloykit.rebasin.spec.load_spec`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alloykit.architecture import layer_stack_prefix, module_kind, split_layer_name
from alloykit.rebasin.spec import AxisPermutation, PermutationSpec, SpecError, check_spec

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class BlockLayout:
    """Module names (relative to a layer) of one transformer family's MLP and attention."""

    name: str
    mlp_in: tuple[str, ...]  # modules whose outputs are the MLP's hidden units
    mlp_out: str  # the module that reads them
    attention_in: tuple[str, ...]  # q, k, v (or one fused qkv module)
    attention_out: str
    transposed: bool = False  # GPT-2's Conv1D stores weights as (in, out)


LAYOUTS = (
    BlockLayout(
        "llama",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj",
    ),
    BlockLayout(
        "mlp-up-down",  # Phi-3 style models without a gate, and Starcoder2
        ("mlp.up_proj",),
        "mlp.down_proj",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj",
    ),
    BlockLayout(
        "opt",
        ("fc1",),
        "fc2",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.out_proj",
    ),
    BlockLayout(
        "clip",
        ("mlp.fc1",),
        "mlp.fc2",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.out_proj",
    ),
    BlockLayout("gpt2", ("mlp.c_fc",), "mlp.c_proj", ("attn.c_attn",), "attn.c_proj", True),
    BlockLayout(
        "bert",
        ("intermediate.dense",),
        "output.dense",
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attention.output.dense",
    ),
)


def infer_spec(shapes: Shapes, config: Mapping[str, Any] | None, label: str) -> PermutationSpec:
    """The permutation spec of a model, from its tensor names and shapes and its config.

    Raises SpecError naming the model when neither a transformer layout nor a sequential
    network fits, with the advice to declare a spec in YAML (``--spec``).
    """
    prefix = layer_stack_prefix(shapes)
    if prefix is not None:
        layers = _layer_indices(shapes, prefix)
        for layout in LAYOUTS:
            modules = (*layout.mlp_in, layout.mlp_out)
            if all(f"{prefix}{i}.{m}.weight" in shapes for i in layers for m in modules):
                spec = _transformer_spec(shapes, config, prefix, layout)
                check_spec(spec, shapes, label)
                return spec
    attention = next((n for n in shapes if module_kind(n) in ("attention", "embedding")), None)
    if attention is not None:  # a chain of layers read from it would break the function
        raise SpecError(
            f"cannot infer a permutation spec for model '{label}': its transformer layout "
            f"('{attention}') is not one alloykit knows; declare the permutations in a YAML "
            "spec (--spec, see docs/rebasin.md)"
        )
    return _sequential_spec(shapes, label)


def _layer_indices(shapes: Shapes, prefix: str) -> list[int]:
    """The layer numbers of the stack ``prefix`` (``model.layers.``), in order."""
    return sorted(
        {p.index for n in shapes if (p := split_layer_name(n)) is not None and p.prefix == prefix}
    )


def _axes(
    weight: bool,
    ndim: int,
    out: AxisPermutation | None,
    into: AxisPermutation | None,
    transposed: bool,
) -> tuple[AxisPermutation | None, ...]:
    """Placements for a layer's weight (out, in, ...) or bias (out,) given its groups."""
    if not weight:
        return (out,)
    if transposed:
        return (into, out)
    return (out, into) + (None,) * (ndim - 2)


def _transformer_spec(
    shapes: Shapes, config: Mapping[str, Any] | None, prefix: str, layout: BlockLayout
) -> PermutationSpec:
    layers = _layer_indices(shapes, prefix)
    heads, kv_heads = _head_counts(config)
    sizes: dict[str, int] = {}
    axes: dict[str, tuple[AxisPermutation | None, ...]] = {}
    notes = []
    if heads is None:
        notes.append("attention heads left in place: config.json gives no head count")

    def place(module: str, out: AxisPermutation | None, into: AxisPermutation | None) -> None:
        for kind in ("weight", "bias"):
            name = f"{module}.{kind}"
            if name in shapes and (kind == "weight" or out is not None):
                axes[name] = _axes(
                    kind == "weight", len(shapes[name]), out, into, layout.transposed
                )

    for layer in layers:
        at = f"{prefix}{layer}."
        mlp = AxisPermutation(f"{at}mlp")
        first = shapes[f"{at}{layout.mlp_in[0]}.weight"]
        sizes[mlp.perm] = first[1] if layout.transposed else first[0]
        for module in layout.mlp_in:
            place(at + module, mlp, None)
        place(at + layout.mlp_out, None, mlp)
        if heads is None or not all(f"{at}{m}.weight" in shapes for m in layout.attention_in):
            continue
        # a unit is one key/value head with its query heads (one head without GQA)
        units = kv_heads or heads
        group = f"{at}heads"
        sizes[group] = units
        if len(layout.attention_in) == 1:  # fused q|k|v: three blocks of heads on one axis
            fused = AxisPermutation(group, outer=3)
            if units != heads:
                notes.append(f"{at}: fused qkv with grouped-query attention is left in place")
                del sizes[group]
                continue
            place(at + layout.attention_in[0], fused, None)
        else:
            for module in layout.attention_in:
                place(at + module, AxisPermutation(group), None)
        place(at + layout.attention_out, None, AxisPermutation(group))
    return PermutationSpec(sizes, axes, tuple(notes))


def _head_counts(config: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(attention heads, key/value heads) from a config, top level or ``text_config``."""
    for block in (config, (config or {}).get("text_config")):
        if not isinstance(block, Mapping):
            continue
        for key in ("num_attention_heads", "n_head", "num_heads"):
            if isinstance(block.get(key), int):
                kv = block.get("num_key_value_heads")
                return block[key], kv if isinstance(kv, int) else None
    return None, None


def _natural_key(name: str) -> list[Any]:
    """``layers.10`` after ``layers.2``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _sequential_spec(shapes: Shapes, label: str) -> PermutationSpec:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        module, _, kind = name.rpartition(".")
        modules.setdefault(module, {})[kind] = shape
    order = sorted(modules, key=_natural_key)
    layers = [m for m in order if len(modules[m].get("weight", ())) >= 2]
    norms = [
        m for m in order if len(modules[m].get("weight", ())) == 1 or "running_mean" in modules[m]
    ]
    hint = "declare the permutations in a YAML spec (--spec, see docs/rebasin.md)"
    if len(layers) < 2:
        raise SpecError(f"cannot infer a permutation spec for model '{label}': {hint}")
    for module in order:
        if (
            module not in layers
            and module not in norms
            and any(len(s) for s in modules[module].values())
        ):
            raise SpecError(
                f"cannot infer a permutation spec for model '{label}': module '{module}' is "
                f"neither a linear/conv layer nor a norm; {hint}"
            )
    owner = {norm: _norm_owner(norm, layers, order, label, hint) for norm in norms}
    sizes: dict[str, int] = {}
    axes: dict[str, tuple[AxisPermutation | None, ...]] = {}
    previous: AxisPermutation | None = None
    for index, module in enumerate(layers):
        weight = modules[module]["weight"]
        if previous is not None and weight[1] % sizes[previous.perm]:
            raise SpecError(
                f"cannot infer a permutation spec for model '{label}': '{module}.weight' takes "
                f"{weight[1]} inputs, but the layer before it gives {sizes[previous.perm]}; {hint}"
            )
        out = None if index == len(layers) - 1 else AxisPermutation(module)
        if out is not None:
            sizes[module] = weight[0]
        for kind, shape in modules[module].items():
            if kind == "weight" or (len(shape) == 1 and out is not None):
                axes[f"{module}.{kind}"] = _axes(kind == "weight", len(shape), out, previous, False)
        for norm in norms:
            if owner[norm] != module or out is None:
                continue
            for kind, shape in modules[norm].items():
                if len(shape) == 1:
                    axes[f"{norm}.{kind}"] = (out,)
        previous = out
    spec = PermutationSpec(sizes, axes)
    try:
        check_spec(spec, shapes, label)
    except SpecError as e:
        raise SpecError(f"cannot infer a permutation spec for model '{label}' ({e}); {hint}") from e
    return spec


def _norm_owner(norm: str, layers: list[str], order: list[str], label: str, hint: str) -> str:
    """The layer a norm normalises: same parent and trailing number, else the one before it."""
    parent, _, leaf = norm.rpartition(".")
    number = re.search(r"(\d+)$", leaf)
    if number is not None and not leaf.isdigit():
        for layer in layers:
            layer_parent, _, layer_leaf = layer.rpartition(".")
            if layer_parent == parent and re.search(rf"\D{number[1]}$", layer_leaf):
                return layer
    before = [m for m in order[: order.index(norm)] if m in layers]
    if not before:
        raise SpecError(
            f"cannot infer a permutation spec for model '{label}': no layer before norm "
            f"'{norm}'; {hint}"
        )
    return before[-1]
