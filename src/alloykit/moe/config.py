"""The ``alloykit moe`` config: MergeKit's ``mergekit-moe`` YAML schema and its checks.

A user's mergekit-moe file works unchanged::

    base_model: ./base                 # attention, norms, embeddings and head come from here
    gate_mode: hidden                  # hidden | cheap_embed | random | uniform_random
    dtype: bfloat16                    # optional; default: the base model's dtype
    experts_per_token: 2               # default 2
    architecture: mixtral              # optional: mixtral | qwen2_moe | qwen3_moe (a prefix)
    experts:
      - source_model: ./math
        positive_prompts: ["solve", "integral"]
        negative_prompts: ["poem"]     # optional
        noise_scale: 0.01              # optional: gaussian noise added to the expert's weights
        residual_scale: 0.5            # optional: multiplies the expert's down_proj
    shared_experts:                    # optional (Qwen2-MoE takes exactly one)
      - source_model: ./base
        positive_prompts: ["..."]
    base_merge:                        # alloykit's addition (optional): attention, norms,
      merge_method: task_arithmetic    # embeddings and head merged by any method instead
      base_model: ./base               # of copied from base_model
      models: [...]

:func:`load_moe_config` checks the whole file and reports every problem at once, each with
its YAML path, before any model is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alloykit.config import (
    MergeConfig,
    ModelRef,
    check_config,
    normalize_dtype,
    parse_config,
    read_documents,
)
from alloykit.errors import ConfigError

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
# Modes that read prompts, so every expert needs positive prompts. MergeKit also asks for them
# with uniform_random, which never reads them; alloykit accepts that config with or without.
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")


class Expert(BaseModel):
    """One entry of ``experts:`` or ``shared_experts:``: a dense model and its prompts."""

    model_config = ConfigDict(extra="forbid")
    source_model: ModelRef
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    noise_scale: float | None = Field(default=None, ge=0)
    residual_scale: float | None = None


class MoEConfig(BaseModel):
    """A mixture-of-experts recipe, as written in YAML (mergekit-moe's schema)."""

    model_config = ConfigDict(extra="forbid")
    base_model: ModelRef
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: int = Field(default=2, ge=1)
    architecture: str | None = None
    shared_experts: list[Expert] | None = None
    base_merge: dict[str, Any] | None = None  # a merge recipe for the non-expert tensors

    def to_yaml(self) -> str:
        """The config as YAML that :func:`load_moe_config` reads back to an equal config."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["base_model"] = str(self.base_model)
        for key in ("experts", "shared_experts"):
            for entry, expert in zip(data.get(key) or [], getattr(self, key) or [], strict=True):
                entry["source_model"] = str(expert.source_model)
        return yaml.safe_dump(data, sort_keys=False)


def load_moe_config(source: str | Path | Mapping[str, Any] | MoEConfig) -> MoEConfig:
    """Read and validate an MoE config from a YAML file, YAML text, a dict or a MoEConfig.

    Raises ConfigError listing every problem, each with its YAML path.

    Example:
        >>> cfg = load_moe_config({"base_model": "b", "gate_mode": "random",
        ...     "experts": [{"source_model": "x"}, {"source_model": "y"}]})
        >>> cfg.experts_per_token
        2
    """
    if isinstance(source, MoEConfig):
        config = source
    else:
        data = source if isinstance(source, Mapping) else _single_document(source)
        try:
            config = MoEConfig.model_validate(dict(data))
        except ValidationError as e:
            problems = []
            for error in e.errors():
                where = ".".join(
                    f"[{part}]" if isinstance(part, int) else str(part) for part in error["loc"]
                ).replace(".[", "[")
                problems.append(f"{where or 'config'}: {error['msg']}")
            raise ConfigError(problems) from e
    problems = check_moe_config(config)
    if problems:
        raise ConfigError(problems)
    return config


def _single_document(source: str | Path) -> Any:
    documents = read_documents(source)
    if len(documents) != 1:
        raise ConfigError(f"MoE config '{source}' holds {len(documents)} YAML documents; use one")
    return documents[0]


def check_moe_config(config: MoEConfig) -> list[str]:
    """Every problem of ``config`` that needs no model to see, each with its YAML path."""
    problems = []
    count = len(config.experts)
    if config.experts_per_token > count:
        problems.append(
            f"experts_per_token: {config.experts_per_token} is more than the {count} experts"
        )
    if config.dtype is not None and normalize_dtype(config.dtype) is None:
        problems.append(f"dtype: '{config.dtype}' is not float32, float16, bfloat16 or float64")
    if config.gate_mode in PROMPT_MODES:
        for i, expert in enumerate(config.experts):
            if not expert.positive_prompts:
                problems.append(
                    f"experts[{i}].positive_prompts: gate_mode '{config.gate_mode}' needs at "
                    "least one prompt per expert (or use gate_mode: random)"
                )
        prompt_sets = {
            (tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in config.experts
        }
        if count > 1 and len(prompt_sets) == 1 and config.experts[0].positive_prompts:
            problems.append(
                "experts: every expert has the same prompts, so their gates would be equal; "
                "give each expert prompts of its own"
            )
    for i, shared in enumerate(config.shared_experts or []):
        if config.gate_mode in PROMPT_MODES and not shared.positive_prompts:
            problems.append(
                f"shared_experts[{i}].positive_prompts: gate_mode '{config.gate_mode}' sets the "
                "shared expert's gate from its prompts; give at least one (or use gate_mode: random)"
            )
        if shared.noise_scale:
            problems.append(f"shared_experts[{i}].noise_scale: not supported on a shared expert")
    if len(config.shared_experts or []) > 1:
        problems.append("shared_experts: at most one shared expert is supported")
    if config.base_merge is not None:
        try:
            base_merge_config(config)
        except ConfigError as e:
            problems.extend(f"base_merge.{problem}" for problem in e.problems)
    return problems


def base_merge_config(config: MoEConfig) -> MergeConfig | None:
    """``base_merge`` as a validated merge recipe (None when the config has none).

    Raises ConfigError listing its problems (paths relative to ``base_merge``).
    """
    if config.base_merge is None:
        return None
    recipe = parse_config(config.base_merge)
    check_config(recipe)
    return recipe
