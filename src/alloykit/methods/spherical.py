"""Interpolation on the sphere: slerp between two models' weights."""

from __future__ import annotations

import math

import torch

from alloykit.methods.registry import MethodInputs
from alloykit.methods.task_vectors import stable_sum

# MergeKit's threshold: inputs closer to colinear than this are lerped (reference §1.5).
COLINEAR = 0.9995
_NORM_EPSILON = 1e-8


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation of two whole tensors (Shoemake 1985; MergeKit's ``slerp``).

    Both tensors are one flattened vector each: ``cos θ = <v0/‖v0‖, v1/‖v1‖>``; when
    ``|cos θ| > 0.9995`` the result is the plain lerp ``v0 + t·(v1 − v0)``, else
    ``sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1``. ``t = 0`` gives ``v0`` (the base).
    The dot product is a float64 sum in a fixed order, so the result does not depend on threads.

    Args:
        v0: the base model's tensor (t = 0).
        v1: the other model's tensor (t = 1).
        t: interpolation factor.

    Returns:
        The interpolated tensor.

    Example:
        >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        tensor([0.7071, 0.7071])
    """
    norm0 = math.sqrt(stable_sum(v0.double() ** 2))
    norm1 = math.sqrt(stable_sum(v1.double() ** 2))
    unit0 = v0 / norm0 if norm0 > _NORM_EPSILON else v0
    unit1 = v1 / norm1 if norm1 > _NORM_EPSILON else v1
    dot = stable_sum(unit0.double() * unit1.double())
    if abs(dot) > COLINEAR:  # 1) nearly colinear: the sphere is flat here
        return v0 + t * (v1 - v0)
    theta = math.acos(dot)  # 2) the angle between the two directions
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


def run_slerp(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`slerp` from the base (t = 0) to the one other model."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return slerp(inputs.base, inputs.tensors[0], float(inputs.params["t"]))
