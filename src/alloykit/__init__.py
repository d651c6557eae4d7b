"""alloykit: merge the weights of models fine-tuned from one base.

The public API is a handful of verbs:

- :func:`merge` (config -> model folder) and :func:`merge_to_state_dict` (config -> tensors);
  :func:`merge_in_memory` (tensors, plan and recipe hash);
- :func:`plan_merge` (what a merge will do, without reading tensors);
- :func:`load_config` and :class:`MergeConfig` (MergeKit-compatible YAML), :func:`recipe_hash`;
- :data:`METHODS` and :func:`get_method`, the method registry;
- :func:`evaluate` and :class:`EvalOptions`: score a model, merge config or state dict on tasks;
- :func:`inspect_models` and :func:`inspect_config`, task-vector diagnostics.

Example:
    >>> import alloykit
    >>> alloykit.merge("examples/linear.yml", "merged")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Ask PyTorch to back large CPU tensors (>= 2 MB) with transparent huge pages. Without it, every
# new tensor of a merge (tens of MB each) is faulted in 4 KB page by page, which made a simple
# elementwise op on 11M floats take ~5.4 ns per element instead of ~1.2 (benchmarks/RESULTS.md).
# Read once by PyTorch at its first allocation, so it only applies when alloykit is imported
# before torch (always the case for the `alloykit` command); set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "EvalOptions",
    "MergeConfig",
    "MergeOptions",
    "evaluate",
    "get_method",
    "inspect_config",
    "inspect_models",
    "load_config",
    "merge",
    "merge_in_memory",
    "merge_to_state_dict",
    "plan_merge",
    "recipe_hash",
]

# Names resolve on first use, so `import alloykit` (and `alloykit --help`) stays fast.
_LAZY = {
    "METHODS": "alloykit.methods",
    "get_method": "alloykit.methods",
    "MergeConfig": "alloykit.config",
    "load_config": "alloykit.config",
    "recipe_hash": "alloykit.config",
    "MergeOptions": "alloykit.pipeline",
    "merge": "alloykit.pipeline",
    "merge_to_state_dict": "alloykit.pipeline",
    "merge_in_memory": "alloykit.pipeline",
    "plan_merge": "alloykit.pipeline",
    "evaluate": "alloykit.evaluation",
    "EvalOptions": "alloykit.evaluation",
    "inspect_models": "alloykit.inspect.collect",
    "inspect_config": "alloykit.inspect.collect",
}

if TYPE_CHECKING:
    from alloykit.config import MergeConfig, load_config, recipe_hash
    from alloykit.evaluation import EvalOptions, evaluate
    from alloykit.inspect.collect import inspect_config, inspect_models
    from alloykit.methods import METHODS, get_method
    from alloykit.pipeline import (
        MergeOptions,
        merge,
        merge_in_memory,
        merge_to_state_dict,
        plan_merge,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'alloykit' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module), name)
