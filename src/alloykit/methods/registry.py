"""Declarations shared by every merge method: parameters, inputs and the registry row.

A method is a pure kernel function plus one :class:`Method` row that says what it is called,
which parameters it takes (name, default, scope, range), how it treats the base model and
which paper it comes from. The config validator, ``alloykit methods``, the plan table and
the docs all read these rows; no default appears anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

Scalar = float | int | bool | str

# Properties a method may declare; tests/methods/test_properties.py checks each declared one.
#   idempotent: merging k identical models (the base identical too) returns that model;
#   constant: when every input is the same constant tensor and the per-model weights sum to
#             one (unequal), the output is that constant;
#   symmetric: permuting the non-base models (with their per-model parameters) changes nothing.
Property = Literal["idempotent", "constant", "symmetric"]
PROPERTIES: tuple[Property, ...] = ("idempotent", "constant", "symmetric")


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    Args:
        name: the YAML key (MergeKit's name where MergeKit has the method).
        default: value when the config gives none; ``None`` makes the parameter required.
        per_model: True for per-model ("tensor") parameters such as ``weight``; False for
            global ones such as ``normalize``.
        kind: ``"float"``, ``"int"``, ``"bool"`` or ``"choice"`` (one of ``choices``).
        low, high: inclusive bounds, ``None`` for unbounded.
        doc: one line for ``alloykit methods NAME`` and the docs.
        effect: False for parameters accepted only so MergeKit configs validate unchanged.
    """

    name: str
    default: Scalar | None = None
    per_model: bool = False
    kind: Literal["float", "int", "bool", "choice"] = "float"
    low: float | None = None
    high: float | None = None
    doc: str = ""
    effect: bool = True
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value: Any) -> str | None:
        """A problem with ``value`` (one scalar) for this parameter, or None when it is fine."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{value!r} is not true or false"
        if self.kind == "choice":
            options = ", ".join(self.choices)
            return None if value in self.choices else f"{value!r} is not one of {options}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{value!r} is not a number"
        if self.kind == "int" and not float(value).is_integer():
            return f"{value!r} is not an integer"
        if value != value or value in (float("inf"), float("-inf")):
            return f"{value!r} is not finite"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            return f"{value!r} is outside [{low}, {high}]"
        return None


@dataclass(frozen=True)
class MethodInputs:
    """What a method kernel receives for one output tensor.

    ``tensors`` holds the non-base inputs stacked on dim 0, ``(k, *shape)``; ``base`` is the
    base model's tensor or None; ``per_model`` maps each per-model parameter to a ``(k,)``
    float64 tensor aligned with ``tensors``; ``params`` holds the global parameters.
    The executor allocates ``tensors`` for this one call, so a registry adapter may reuse it
    in place to save memory; the kernels themselves never modify their arguments.

    ``statistics`` holds, for a method that declares some (:attr:`Method.statistics`), one
    calibration statistic per input stacked on dim 0, or None where the models have none for
    this tensor (a norm gain has no Gram matrix): ``(k, d, d)`` Gram matrices of the inputs of
    axis ``input_axis`` (a linear layer's input channels), or ``(k, *shape)`` diagonal Fishers.
    """

    tensors: torch.Tensor
    base: torch.Tensor | None
    per_model: Mapping[str, torch.Tensor]
    params: Mapping[str, Any]
    generator: torch.Generator | None = None
    statistics: torch.Tensor | None = None
    input_axis: int = -1


@dataclass(frozen=True)
class Method:
    """A registry row: a kernel and everything the rest of alloykit needs to know about it.

    ``base`` says how the method uses ``base_model``: ``"required"`` (task-vector methods,
    slerp), ``"optional"``, or ``"input"`` (the base is one more ordinary input with its own
    per-model parameters, as in MergeKit's linear).
    """

    name: str
    run: Callable[[MethodInputs], torch.Tensor]
    params: tuple[Param, ...]
    base: Literal["required", "optional", "input"]
    summary: str
    formula: str
    citation: str
    min_models: int = 1
    max_models: int | None = None  # the most models besides the base (None: no limit)
    # Which of PROPERTIES hold (at the default parameters; random methods for one seed).
    properties: frozenset[Property] = frozenset()
    # Calibration statistics the kernel needs per input (see MethodInputs.statistics).
    statistics: Literal["gram", "fisher"] | None = None
    # A problem with one tensor's resolved parameters (per_model, params), found at plan time.
    check: Callable[[Mapping[str, tuple[float, ...]], Mapping[str, Any]], str | None] | None = None

    def param(self, name: str) -> Param | None:
        """The declaration of parameter ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)
