"""The merge-method registry: every method alloykit knows, by its MergeKit name.

Each row is a :class:`Method` (kernel, parameters, base handling, citation). Look methods up
with :func:`get_method`, which names the known ones when a name is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alloykit.errors import ConfigError, did_you_mean
from alloykit.methods.linear import run_linear
from alloykit.methods.registry import Method, MethodInputs, Param
from alloykit.methods.task_vectors import ZERO_WEIGHT_SUM, run_task_arithmetic

WEIGHT = Param(
    "weight", per_model=True, doc="the model's weight in the sum; negative values subtract"
)
INT8_MASK = Param(
    "int8_mask",
    default=False,
    kind="bool",
    doc="MergeKit memory option; accepted so its configs run, no effect in alloykit",
    effect=False,
)


def _weights_must_not_cancel(
    per_model: Mapping[str, tuple[float, ...]], params: Mapping[str, Any]
) -> str | None:
    """linear divides by the sum of weights: a zero sum has no meaning (MergeKit gives NaN)."""
    total = sum(per_model.get("weight", ()))
    if params.get("normalize") and abs(total) < ZERO_WEIGHT_SUM:
        return (
            f"the weights sum to {total:g}, and normalize: true would divide by it; change a "
            "weight or set normalize: false"
        )
    return None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name="linear",
            run=run_linear,
            params=(
                WEIGHT,
                Param("normalize", default=True, kind="bool", doc="divide by the sum of weights"),
            ),
            base="input",
            check=_weights_must_not_cancel,
            summary="weighted average of the models' weights (model soup)",
            formula="out = Σ w_i·x_i / Σ w_i   (no division when normalize: false)",
            citation="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
        ),
        Method(
            name="task_arithmetic",
            run=run_task_arithmetic,
            params=(
                WEIGHT,
                Param("lambda", default=1.0, doc="scales the combined task vector"),
                Param("normalize", default=False, kind="bool", doc="divide by the sum of weights"),
                INT8_MASK,
            ),
            base="required",
            summary="add weighted task vectors (fine-tune minus base) to the base",
            formula="out = base + λ·Σ w_i·(x_i − base)   (/ Σ w_i when normalize: true)",
            citation="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
        ),
    )
}


def get_method(name: str) -> Method:
    """The registry row for ``name``; a ConfigError listing the known names otherwise."""
    method = METHODS.get(name)
    if method is None:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(
            f"merge_method: unknown method '{name}'{did_you_mean(name, METHODS)}; known: {known}"
        )
    return method


__all__ = ["METHODS", "Method", "MethodInputs", "Param", "get_method"]
