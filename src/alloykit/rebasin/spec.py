"""Permutation specs: which axes of which tensors a hidden-unit permutation acts on.

A network computes the same function when the hidden units between two layers are permuted,
provided every tensor that touches those units is permuted consistently: the rows of the
layer that produces them (weight and bias, and the norm after it), and the columns of the
layer that consumes them. A :class:`PermutationSpec` names each such permutation (a
*permutation group*) and records, for every tensor, which group permutes each of its axes
(Ainsworth, Hayase and Srinivasa 2023, "Git Re-Basin", arXiv:2209.04836, section 3).

An axis may hold several units' worth of entries: a permutation of ``n`` units acts on an axis
of size ``outer * n * inner`` viewed as ``(outer, n, inner)``, permuting the middle factor.
That one rule covers whole attention heads (``inner`` = head size), fused q/k/v projections
(``outer`` = 3) and a convolution's channels flattened into a linear layer (``inner`` = the
spatial size).

Specs are inferred (:mod:`alloykit.rebasin.infer`) or declared in YAML (:func:`load_spec`)::

    permutations:          # optional sizes (units); default: the smallest axis it permutes
      heads: 4
    tensors:
      fc1.weight: [hidden, null]
      fc1.bias: [hidden]
      fc2.weight: [null, hidden]
      attn.qkv.weight: [{perm: heads, outer: 3}, null]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from alloykit.errors import AlloyError, ConfigError

# One permutation per group: ``index[i]`` is the unit of the permuted model's input that
# becomes unit ``i`` of its output (``aligned = tensor[index]`` along the axis).
Permutations = dict[str, torch.Tensor]


class SpecError(AlloyError):
    """A permutation spec does not fit a model, or cannot be inferred for it."""


@dataclass(frozen=True)
class AxisPermutation:
    """Permutation group ``perm`` acting on an axis viewed as ``(outer, units, inner)``."""

    perm: str
    outer: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Permutation groups (name -> number of units) and, per tensor, the group of each axis.

    Tensors that no group touches (embeddings, the output layer's rows, a ``num_batches_tracked``
    counter) are absent from ``axes`` and are copied unchanged.
    """

    sizes: dict[str, int]
    axes: dict[str, tuple[AxisPermutation | None, ...]]
    notes: tuple[str, ...] = field(default=())  # what inference left out, for the user

    def uses(self, perm: str) -> list[tuple[str, int, AxisPermutation]]:
        """Every (tensor, axis, placement) that group ``perm`` permutes."""
        return [
            (name, axis, placement)
            for name, placements in self.axes.items()
            for axis, placement in enumerate(placements)
            if placement is not None and placement.perm == perm
        ]


def unit_view(
    tensor: torch.Tensor, axis: int, placement: AxisPermutation, units: int
) -> torch.Tensor:
    """``tensor`` as a ``(units, rest)`` matrix: one row per unit of ``axis``'s permutation."""
    moved = tensor.movedim(axis, 0)
    inner = moved.shape[0] // (placement.outer * units)
    grouped = moved.reshape(placement.outer, units, inner, -1)  # (outer, units, inner, rest)
    return grouped.transpose(0, 1).reshape(units, -1)


def permute_axis(
    tensor: torch.Tensor, axis: int, placement: AxisPermutation, index: torch.Tensor
) -> torch.Tensor:
    """``tensor`` with the units of ``axis`` reordered by ``index`` (exact: only indexing)."""
    moved = tensor.movedim(axis, 0)
    units = index.numel()
    inner = moved.shape[0] // (placement.outer * units)
    grouped = moved.reshape(placement.outer, units, inner, -1)  # (outer, units, inner, rest)
    permuted = grouped.index_select(1, index).reshape(moved.shape)
    return permuted.movedim(0, axis)


def permute_tensor(
    name: str,
    tensor: torch.Tensor,
    spec: PermutationSpec,
    perms: Permutations,
    except_axis: int | None = None,
) -> torch.Tensor:
    """Tensor ``name`` with every group of ``spec`` applied, except on ``except_axis``."""
    for axis, placement in enumerate(spec.axes.get(name, ())):
        if placement is not None and axis != except_axis:
            tensor = permute_axis(tensor, axis, placement, perms[placement.perm])
    return tensor


def apply_permutations(
    spec: PermutationSpec, perms: Permutations, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict: ``state`` with ``perms`` applied; the function it computes is unchanged.

    Example:
        >>> spec = PermutationSpec({"h": 2}, {"a": (AxisPermutation("h"), None), "b": (None, AxisPermutation("h"))})
        >>> out = apply_permutations(spec, {"h": torch.tensor([1, 0])}, {"a": torch.eye(2)[:, :1], "b": torch.ones(1, 2)})
        >>> out["a"].flatten().tolist()
        [0.0, 1.0]
    """
    return {
        name: permute_tensor(name, tensor, spec, perms).contiguous()
        for name, tensor in state.items()
    }


def identity_permutations(spec: PermutationSpec) -> Permutations:
    """The identity permutation of every group."""
    return {perm: torch.arange(size) for perm, size in spec.sizes.items()}


def check_spec(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], label: str) -> None:
    """Raise SpecError naming the tensor when ``spec`` does not fit a model's ``shapes``."""
    for name, placements in spec.axes.items():
        if name not in shapes:
            raise SpecError(f"permutation spec names tensor '{name}', which model '{label}' lacks")
        shape = shapes[name]
        if len(placements) != len(shape):
            raise SpecError(
                f"permutation spec gives {len(placements)} axes for tensor '{name}', which has "
                f"shape {list(shape)} in model '{label}'; give one entry (a group or null) per axis"
            )
        for axis, placement in enumerate(placements):
            if placement is None:
                continue
            units = spec.sizes.get(placement.perm)
            if units is None:
                raise SpecError(f"tensor '{name}' names unknown permutation '{placement.perm}'")
            if shape[axis] % (placement.outer * units):
                raise SpecError(
                    f"tensor '{name}' axis {axis} has size {shape[axis]}, not a multiple of "
                    f"{placement.outer} x {units} units of permutation '{placement.perm}'"
                )


def load_spec(path: Path, shapes: Mapping[str, tuple[int, ...]], label: str) -> PermutationSpec:
    """Read a YAML permutation spec (format in the module docstring) and check it fits ``shapes``.

    A group's size defaults to the smallest ``axis size / outer`` among the axes it permutes;
    give it under ``permutations:`` when its units span several entries (attention heads).
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # YAML errors span lines; the CLI prints one
        raise ConfigError(f"'{path}': cannot read the permutation spec ({reason})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("tensors"), dict):
        raise ConfigError(f"'{path}': a permutation spec needs a 'tensors:' mapping")
    declared = raw.get("permutations") or {}
    if not isinstance(declared, dict) or not all(
        isinstance(v, int) and v > 0 for v in declared.values()
    ):
        raise ConfigError(f"'{path}': 'permutations:' maps group names to positive unit counts")
    axes: dict[str, tuple[AxisPermutation | None, ...]] = {}
    problems = []
    for name, entries in raw["tensors"].items():
        if not isinstance(entries, list):
            problems.append(f"tensors.{name}: give a list with one entry per axis")
            continue
        placements = []
        for axis, entry in enumerate(entries):
            placement = _parse_placement(entry)
            if isinstance(placement, str):
                problems.append(f"tensors.{name}[{axis}]: {placement}")
            else:
                placements.append(placement)
        axes[str(name)] = tuple(placements)
    if problems:
        raise ConfigError([f"'{path}': {p}" for p in problems])
    sizes: dict[str, int] = {str(k): v for k, v in declared.items()}
    for name, declared_axes in axes.items():
        if name not in shapes:
            raise SpecError(
                f"'{path}': tensor '{name}' is not in model '{label}'{_close(name, shapes)}"
            )
        for axis, placement in enumerate(declared_axes):
            if (
                placement is not None
                and placement.perm not in declared
                and axis < len(shapes[name])
            ):
                units = shapes[name][axis] // placement.outer
                sizes[placement.perm] = min(sizes.get(placement.perm, units), units)
    spec = PermutationSpec(sizes, axes)
    check_spec(spec, shapes, label)
    return spec


def spec_to_yaml(spec: PermutationSpec) -> str:
    """``spec`` in the YAML format :func:`load_spec` reads (a starting point for editing)."""

    def entry(placement: AxisPermutation | None) -> object:
        if placement is None:
            return None
        return (
            placement.perm
            if placement.outer == 1
            else {"perm": placement.perm, "outer": placement.outer}
        )

    document = {
        "permutations": dict(spec.sizes),
        "tensors": {name: [entry(p) for p in axes] for name, axes in spec.axes.items()},
    }
    header = "".join(f"# note: {note}\n" for note in spec.notes)
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)


def _parse_placement(entry: Any) -> AxisPermutation | str | None:
    """A YAML axis entry (null, a group name, or {perm, outer}); a problem string when invalid."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return AxisPermutation(entry)
    if isinstance(entry, dict) and isinstance(entry.get("perm"), str):
        outer = entry.get("outer", 1)
        if not isinstance(outer, int) or outer < 1 or set(entry) - {"perm", "outer"}:
            return "use {perm: NAME, outer: N} with a positive integer N"
        return AxisPermutation(entry["perm"], outer)
    return f"'{entry}' is not null, a permutation name or {{perm: NAME, outer: N}}"


def _close(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str:
    from alloykit.errors import did_you_mean

    return did_you_mean(name, shapes)
