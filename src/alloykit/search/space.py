"""The search space: which values of a merge config template a search may change.

A dimension names a place in the template by its YAML path (``models[1].parameters.weight``,
``parameters.lambda``, ``merge_method``), as the config's own error messages do; ``[*]``
stands for every entry of a list and makes one dimension per entry. A dimension is numeric
(``low``/``high``, optionally ``log``, ``step`` or ``int``) or categorical (``choices``).
``layers: N`` makes the value a gradient of N points over the layers (N dimensions), which is
how the config interpolates per-layer values; ``filter: mlp`` sets the value only for tensors
whose names contain ``mlp`` (a ``{filter, value}`` entry placed before the template's own value).

Values reach the optimisers as named parameters: ``models[1].parameters.weight``, with
``@mlp`` for a filter and ``#k`` for gradient point k.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alloykit.errors import AlloyError


class SearchError(AlloyError):
    """A search file, its space or its objective is unusable, or a study cannot resume."""


_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-]*?)?((?:\[(?:\d+|\*)\])*)$")


def parse_path(text: str) -> list[str | int]:
    """``"models[1].parameters.weight"`` -> ``["models", 1, "parameters", "weight"]``.

    ``[*]`` becomes the string ``"*"``. Raises ValueError on a malformed path.
    """
    parts: list[str | int] = []
    for piece in text.split("."):
        match = _PART.fullmatch(piece)
        if not piece or match is None or not (match.group(1) or match.group(2)):
            raise ValueError(f"'{text}' is not a YAML path such as models[0].parameters.weight")
        if match.group(1):
            parts.append(match.group(1))
        for index in re.findall(r"\[(\d+|\*)\]", match.group(2)):
            parts.append("*" if index == "*" else int(index))
    return parts


def format_path(parts: Sequence[str | int]) -> str:
    """The inverse of :func:`parse_path`."""
    text = ""
    for part in parts:
        text += (
            f"[{part}]" if isinstance(part, int) or part == "*" else ("." if text else "") + part
        )
    return text


@dataclass(frozen=True)
class Dimension:
    """One searched value: a place in the template and its range or choices.

    ``point`` is the gradient point (0..layers-1) for per-layer values, None for a scalar.
    """

    name: str
    path: tuple[str | int, ...]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    choices: tuple[Any, ...] | None = None
    filter: str | None = None
    point: int | None = None
    points: int | None = None

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    def from_unit(self, u: float) -> Any:
        """The value at position ``u`` in [0, 1] (for optimisers that work in the unit cube)."""
        u = min(max(float(u), 0.0), 1.0)
        if self.choices is not None:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        assert self.low is not None and self.high is not None
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return self.snap(value)

    def snap(self, value: float) -> float | int:
        """``value`` rounded to the dimension's step or to an integer, kept inside the range."""
        assert self.low is not None and self.high is not None
        if self.integer:
            return int(min(max(round(value), math.ceil(self.low)), math.floor(self.high)))
        if self.step:
            steps = math.floor((self.high - self.low) / self.step + 1e-9)
            value = self.low + min(max(round((value - self.low) / self.step), 0), steps) * self.step
        return float(min(max(value, self.low), self.high))

    def distribution(self) -> Any:
        """The optuna distribution of this dimension."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)


@dataclass(frozen=True)
class Space:
    """The dimensions of a search, in file order, and the template they are written into."""

    template: Mapping[str, Any]
    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def distributions(self) -> dict[str, Any]:
        """``{name: optuna distribution}``."""
        return {d.name: d.distribution() for d in self.dimensions}

    def from_unit(self, vector: Sequence[float]) -> dict[str, Any]:
        """Parameters from a point of the unit cube (one coordinate per dimension)."""
        return {d.name: d.from_unit(u) for d, u in zip(self.dimensions, vector, strict=True)}

    def config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The template with ``params`` written in: a plain merge config (dict)."""
        config = copy.deepcopy(dict(self.template))
        gradients: dict[tuple[tuple[str | int, ...], str | None], list[Any]] = {}
        for dim in self.dimensions:
            value = params[dim.name]
            if dim.point is not None:
                assert dim.points is not None
                key = (dim.path, dim.filter)
                points = gradients.setdefault(key, [None] * dim.points)
                points[dim.point] = value
                if dim.point < dim.points - 1:
                    continue
                value = list(points)
            _write(config, list(dim.path), value, dim.filter)
        return config


def _write(config: dict[str, Any], path: list[str | int], value: Any, where: str | None) -> None:
    """Set ``value`` at ``path`` in ``config``, creating mappings on the way (``parameters``)."""
    node: Any = config
    for depth, part in enumerate(path[:-1]):
        following = path[depth + 1]
        if isinstance(part, int):
            node = node[part]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(following, int) else {}
            node = node[part]
    leaf = path[-1]
    if where is None:
        node[leaf] = value
        return
    current = node.get(leaf) if isinstance(node, dict) else node[leaf]
    entry = {"filter": where, "value": value}
    if isinstance(current, dict):
        current = [current]
    if isinstance(current, list) and current and all(isinstance(e, dict) for e in current):
        for item in current:
            if item.get("filter") == where:
                item["value"] = value
                break
        else:
            current.insert(0, entry)
        node[leaf] = current
    else:
        node[leaf] = [entry] + ([{"filter": None, "value": current}] if current is not None else [])


def _lookup(config: Any, path: Sequence[str | int]) -> Any:
    """The value at ``path`` (None when a mapping key is missing; IndexError/TypeError else)."""
    node = config
    for part in path:
        if isinstance(part, int):
            if not isinstance(node, list):
                raise TypeError("not a list")
            node = node[part]
        else:
            if node is None:
                return None
            if not isinstance(node, dict):
                raise TypeError("not a mapping")
            node = node.get(part)
    return node


def expand(template: Mapping[str, Any], path: Sequence[str | int]) -> list[tuple[str | int, ...]]:
    """Every concrete path ``path`` stands for (``[*]`` over each entry of that list).

    Raises ValueError when a list index is out of range or a ``[*]`` is not over a list.
    """
    paths: list[tuple[str | int, ...]] = [()]
    for part in path:
        grown: list[tuple[str | int, ...]] = []
        for prefix in paths:
            if part == "*":
                node = _lookup(template, prefix)
                if not isinstance(node, list):
                    raise ValueError(f"{format_path(prefix)} is not a list in the template")
                grown += [(*prefix, i) for i in range(len(node))]
            elif isinstance(part, int):
                node = _lookup(template, prefix)
                if not isinstance(node, list) or part >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    raise ValueError(
                        f"{format_path((*prefix, part))}: the template's list has {size} entries"
                    )
                grown.append((*prefix, part))
            else:
                grown.append((*prefix, part))
        paths = grown
    return paths


def dimension_name(path: Sequence[str | int], where: str | None, point: int | None) -> str:
    """The parameter name the optimisers see: the path, ``@filter``, ``#point``."""
    name = format_path(path)
    if where is not None:
        name += f"@{where}"
    if point is not None:
        name += f"#{point}"
    return name
