"""Output architectures of an MoE build and the tensor layout transformers expects for them.

The layout is read, not assumed: the output config is instantiated as a model on the meta
device (no memory) and each of its parameters is classified by name and shape. transformers 5
stores a layer's experts fused (``mlp.experts.gate_up_proj`` (E, 2I, H) and
``mlp.experts.down_proj`` (E, H, I)); older versions store one module per expert
(``block_sparse_moe.experts.3.w1.weight``, ``mlp.experts.3.gate_proj.weight``). Both are built
from the same recipe: which expert, which dense projections (``gate``, ``up``, ``down``), in
which order along the first axis.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from alloykit.errors import IncompatibleModels


@dataclass(frozen=True)
class OutputArchitecture:
    """An MoE architecture alloykit can build, and the dense models it can take."""

    name: str  # the model_type written to config.json
    class_name: str  # the architectures entry
    inputs: tuple[str, ...]  # dense model_types whose attention and norms it can hold
    shared_experts: int  # how many shared experts it takes (0 or 1)
    experts_key: str  # config key for the number of routed experts


ARCHITECTURES: dict[str, OutputArchitecture] = {
    arch.name: arch
    for arch in (
        OutputArchitecture(
            "mixtral", "MixtralForCausalLM", ("llama", "mistral"), 0, "num_local_experts"
        ),
        OutputArchitecture(
            "qwen2_moe", "Qwen2MoeForCausalLM", ("qwen2", "llama", "mistral"), 1, "num_experts"
        ),
        OutputArchitecture("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), 0, "num_experts"),
    )
}
DENSE_MLP = "mlp.{role}_proj.weight"  # a dense expert's projections, after the layer prefix
ROLES = ("gate", "up", "down")
_ROLE_NAMES = {"gate": "gate", "w1": "gate", "up": "up", "w3": "up", "down": "down", "w2": "down"}


def choose_architecture(
    requested: str | None, base_type: str, shared_experts: int
) -> OutputArchitecture:
    """The output architecture: ``requested`` (a case-insensitive prefix of a name, as in
    MergeKit) or the first that takes ``base_type`` models and ``shared_experts`` shared ones.

    Raises IncompatibleModels when none can take them, saying which would.
    """
    if requested is not None:
        key = requested.lower().replace("-", "_")
        matches = [a for name, a in ARCHITECTURES.items() if name.startswith(key)]
        if not matches:
            raise IncompatibleModels(
                f"architecture: '{requested}' is not one of {', '.join(ARCHITECTURES)}"
            )
        arch = matches[0]
        if base_type not in arch.inputs:
            takers = [a.name for a in ARCHITECTURES.values() if base_type in a.inputs]
            raise IncompatibleModels(
                f"architecture: {arch.name} cannot take '{base_type}' models (it takes "
                f"{', '.join(arch.inputs)}); use {' or '.join(takers) or 'llama, mistral, qwen2 or qwen3 experts'}"
            )
        if shared_experts != arch.shared_experts:
            raise IncompatibleModels(
                f"shared_experts: {arch.name} takes exactly {arch.shared_experts} shared "
                f"expert(s), the config has {shared_experts}"
                + (" (add one, e.g. the base model)" if arch.shared_experts else "")
            )
        return arch
    for arch in ARCHITECTURES.values():
        if base_type in arch.inputs and shared_experts == arch.shared_experts:
            return arch
    takers = [a.name for a in ARCHITECTURES.values() if base_type in a.inputs]
    if not takers:
        raise IncompatibleModels(
            f"base_model: '{base_type}' models cannot become experts of any supported MoE "
            f"architecture (llama and mistral -> mixtral or qwen2_moe, qwen2 -> qwen2_moe, "
            "qwen3 -> qwen3_moe)"
        )
    needs = {ARCHITECTURES[t].shared_experts for t in takers}
    raise IncompatibleModels(
        f"shared_experts: {'/'.join(takers)} (the architectures that take '{base_type}' "
        f"models) need{'s' if len(takers) == 1 else ''} {' or '.join(map(str, sorted(needs)))} "
        f"shared expert(s), the config has {shared_experts}"
    )


def output_config(
    arch: OutputArchitecture,
    base_config: Mapping[str, Any],
    *,
    experts: int,
    experts_per_token: int,
    intermediate_size: int,
    shared_intermediate_size: int | None,
    attention_bias: bool,
) -> dict[str, Any]:
    """The output ``config.json`` (without its dtype): the base's, turned into ``arch``.

    Routing weights are renormalised over the chosen experts (``norm_topk_prob``) for the Qwen
    architectures, as Mixtral always does, so identical experts reproduce the dense model.
    """
    config = {k: v for k, v in base_config.items() if k not in ("torch_dtype", "dtype")}
    config.pop("transformers_version", None)
    config.update(model_type=arch.name, architectures=[arch.class_name])
    config[arch.experts_key] = experts
    config["num_experts_per_tok"] = experts_per_token
    config["intermediate_size"] = intermediate_size
    if arch.name == "mixtral":
        config.pop("mlp_bias", None)
        config.pop("attention_bias", None)
    else:
        config.update(
            moe_intermediate_size=intermediate_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    if arch.name == "qwen2_moe":
        config["shared_expert_intermediate_size"] = shared_intermediate_size
        config["qkv_bias"] = attention_bias
    return config


ExpertRef = int | Literal["shared"]


@dataclass(frozen=True)
class Piece:
    """How to make one output tensor.

    ``trunk``: copy ``source`` from the base; ``zeros``: a bias the base does not have;
    ``router``: the layer's gate rows; ``shared_router``: the shared expert's gate row;
    ``experts``: for each expert in ``experts``, its dense projections ``roles`` of
    ``layer_prefix``, concatenated along the first axis (fused tensors stack the experts).
    """

    output: str
    shape: tuple[int, ...]
    kind: Literal["trunk", "zeros", "router", "shared_router", "experts"]
    source: str | None = None
    layer: int | None = None
    layer_prefix: str = ""
    experts: tuple[ExpertRef, ...] = ()
    roles: tuple[str, ...] = ()
    fused: bool = False


_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.)(?P<rest>.+)$")
_FUSED = re.compile(
    r"^(?:mlp|block_sparse_moe)\.experts\.(?P<roles>gate_up|gate|up|down|w1|w2|w3)(?:_proj)?(?:\.weight)?$"
)
_PER_EXPERT = re.compile(
    r"^(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?P<role>gate|up|down|w1|w2|w3)(?:_proj)?\.weight$"
)
_SHARED = re.compile(r"^mlp\.shared_expert\.(?P<role>gate|up|down)_proj\.weight$")


def plan_pieces(
    parameters: Mapping[str, tuple[int, ...]], base_names: set[str], experts: int
) -> list[Piece]:
    """Classify every parameter of the output model into a :class:`Piece`.

    Raises IncompatibleModels for a tensor the output needs that the base lacks (other than a
    bias, written as zeros) and for a base tensor the output has no place for.
    """
    pieces = []
    for name, shape in parameters.items():
        match = _LAYER.match(name)
        rest = match["rest"] if match else ""
        layer = int(match["layer"]) if match else None
        prefix = match["prefix"] if match else ""
        if rest in ("mlp.gate.weight", "block_sparse_moe.gate.weight"):
            pieces.append(Piece(name, shape, "router", layer=layer))
        elif rest == "mlp.shared_expert_gate.weight":
            pieces.append(Piece(name, shape, "shared_router", layer=layer))
        elif fused := _FUSED.match(rest):
            roles = fused["roles"]
            parts = ("gate", "up") if roles == "gate_up" else (_ROLE_NAMES[roles],)
            pieces.append(
                Piece(
                    name,
                    shape,
                    "experts",
                    layer=layer,
                    layer_prefix=prefix,
                    experts=tuple(range(experts)),
                    roles=parts,
                    fused=True,
                )
            )
        elif single := _PER_EXPERT.match(rest):
            pieces.append(
                Piece(
                    name,
                    shape,
                    "experts",
                    layer=layer,
                    layer_prefix=prefix,
                    experts=(int(single["expert"]),),
                    roles=(_ROLE_NAMES[single["role"]],),
                )
            )
        elif shared := _SHARED.match(rest):
            pieces.append(
                Piece(
                    name,
                    shape,
                    "experts",
                    layer=layer,
                    layer_prefix=prefix,
                    experts=("shared",),
                    roles=(shared["role"],),
                )
            )
        elif name in base_names:
            pieces.append(Piece(name, shape, "trunk", source=name))
        elif name.endswith(".bias"):
            pieces.append(Piece(name, shape, "zeros"))
        else:
            raise IncompatibleModels(
                f"the output model needs tensor '{name}', which the base model does not have; "
                "choose an architecture made for the experts' model type"
            )
    dense_mlp = {n for n in base_names if (m := _LAYER.match(n)) and m["rest"].startswith("mlp.")}
    placed = {p.source for p in pieces if p.kind == "trunk"}
    left_out = sorted(base_names - placed - dense_mlp)
    if left_out:
        raise IncompatibleModels(
            f"the output architecture has no place for the base model's tensor '{left_out[0]}' "
            f"({len(left_out)} such tensors); choose an architecture made for its model type"
        )
    return pieces


def meta_parameters(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters transformers builds for ``config`` (tied ones once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    model_type = data.pop("model_type")
    data.pop("architectures", None)
    hf_config = AutoConfig.for_model(model_type, **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    names = {n for n, _ in model.named_parameters()}
    return {n: tuple(p.shape) for n, p in model.state_dict().items() if n in names}
