"""Mixture-of-experts assembly from dense experts (MergeKit's ``mergekit-moe``).

A base model and N dense fine-tunes of it become a Mixtral, Qwen2-MoE or Qwen3-MoE model:
attention, norms and embeddings from the base, each expert's MLP copied into its slot, routers
initialised from prompts (:mod:`alloykit.moe.gates`). Modules: ``config`` (the YAML schema),
``layout`` (output architectures and the tensor layout transformers expects), ``gates``
(router initialisation), ``plan`` (checks and the plan), ``build`` (assembly and writing).

Example:
    >>> from alloykit.moe import build_moe
    >>> build_moe("moe.yml", "moe-model")  # doctest: +SKIP
"""

from __future__ import annotations

from alloykit.moe.build import MoEOptions, MoEResult, build_moe
from alloykit.moe.config import Expert, MoEConfig, load_moe_config
from alloykit.moe.plan import MoEPlan, plan_moe

__all__ = [
    "Expert",
    "MoEConfig",
    "MoEOptions",
    "MoEPlan",
    "MoEResult",
    "build_moe",
    "load_moe_config",
    "plan_moe",
]
