"""Passthrough: copy one model's tensor (optionally scaled), for layer stacking."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from alloykit.methods.registry import MethodInputs


def passthrough(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The tensor unchanged, or times ``scale`` (MergeKit's ``passthrough`` and its ``scale``).

    Used with ``slices`` to build deeper models from layers of several (frankenmerges, depth
    up-scaling as in SOLAR, Kim et al. 2023, arXiv:2312.15166).

    Example:
        >>> passthrough(torch.tensor([1.0, -2.0]), 0.5)
        tensor([ 0.5000, -1.0000])
    """
    return tensor.clone() if scale == 1.0 else tensor * scale


def run_passthrough(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: the single input, scaled."""
    return passthrough(inputs.tensors[0], float(inputs.per_model["scale"][0]))


def exactly_one_model(
    per_model: Mapping[str, tuple[float, ...]], params: Mapping[str, Any]
) -> str | None:
    """passthrough copies one tensor: each slice must have exactly one source."""
    count = len(per_model["scale"])
    if count != 1:
        return (
            f"passthrough takes exactly one model per slice, got {count}; use one source per slice"
        )
    return None
