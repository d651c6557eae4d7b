"""An inspection in words (the terminal summary) and as JSON (every figure, per layer and kind).

The words pick out what a user acts on: models that do not share the base, pairs of task
vectors that conflict (and in which layers and modules), where each model changed most, and
with a recipe how much of each task vector survives and where the merge interferes most.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from alloykit.inspect.collect import Inspection
from alloykit.inspect.stats import (
    CONFLICT_TOP,
    NOT_SHARED_COSINE,
    NOT_SHARED_RELATIVE,
    TOP_SHARES,
    Sums,
    shares_base,
)

# Sign conflict worth a sentence: unrelated task vectors disagree on about half the signs,
# fine-tunes of one base with a common direction on far fewer.
CONFLICT_NOTABLE = 0.25
INTERFERENCE_NOTABLE = 0.5  # the merged change differs from task arithmetic by half its size


def short_names(models: list[str]) -> list[str]:
    """Display names: each model's last path part, or the whole label where those collide."""
    names = [Path(m.rstrip("/")).name or m for m in models]
    return [n if names.count(n) == 1 else m for n, m in zip(names, models, strict=True)]


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else round(value, 6)


def _figures(sums: Sums, names: list[str]) -> dict[str, Any]:
    """Every figure of one group of tensors, keyed by model name or ``"a|b"`` pair."""
    relative, cosine, conflict = sums.relative_norm(), sums.cosine(), sums.conflict()
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    figures: dict[str, Any] = {
        "tensors": sums.tensors,
        "parameters": sums.numel,
        "delta_norm": {n: _number(v) for n, v in zip(names, sums.delta_norm(), strict=True)},
        "relative_norm": {n: _number(v) for n, v in zip(names, relative, strict=True)},
        "top_share": {
            n: {f"{share:.0%}": _number(v) for share, v in zip(TOP_SHARES, row, strict=True)}
            for n, row in zip(names, sums.top_share(), strict=True)
        },
        "cosine": {f"{names[i]}|{names[j]}": _number(cosine[i, j]) for i, j in pairs},
        "sign_conflict": {f"{names[i]}|{names[j]}": _number(conflict[i, j]) for i, j in pairs},
    }
    if sums.recipe:
        figures["retained"] = {n: _number(v) for n, v in zip(names, sums.retained(), strict=True)}
        figures["interference"] = _number(sums.interference())
    return figures


def to_json(inspection: Inspection) -> dict[str, Any]:
    """Every figure of the inspection as plain data (None where a figure is undefined)."""
    names = short_names(inspection.models)
    total = inspection.total()
    matrices = inspection.matrices
    models = []
    for i, (label, name) in enumerate(zip(inspection.models, names, strict=True)):
        relative, cosine = float(matrices.relative_norm()[i]), float(matrices.base_cosine()[i])
        models.append(
            {
                "name": name,
                "model": label,
                "matrix_relative_norm": _number(relative),
                "matrix_base_cosine": _number(cosine),
                "shares_base": bool(shares_base(relative, cosine)) if total.delta_sq[i] else None,
            }
        )
    layers = []
    for layer in inspection.layers:
        entry = {"layer": layer, **_figures(inspection.layer(layer), names)}
        entry["kinds"] = {
            kind: _figures(inspection.groups[(layer, kind)], names)
            for kind in inspection.kinds
            if (layer, kind) in inspection.groups
        }
        layers.append(entry)
    outside = {
        kind: _figures(inspection.groups[(None, kind)], names)
        for kind in inspection.kinds
        if (None, kind) in inspection.groups
    }
    return {
        "base": inspection.base,
        "models": models,
        "method": inspection.method,
        "definitions": {
            "relative_norm": "‖δ‖ / ‖base‖ over the group's tensors",
            "cosine": "cosine of the task vectors laid end to end",
            "sign_conflict": f"share of opposite signs among entries in both top {CONFLICT_TOP:.0%}",
            "top_share": "share of ‖δ‖² in each tensor's top p% entries by magnitude",
            "retained": "share of ‖δ‖² on entries that survive sparsify and elect",
            "interference": "‖merged δ − Σ c_i δ_i‖ / ‖Σ c_i δ_i‖, c_i = weight·lambda (/Σ weight with normalize)",
            "shares_base": f"matrix relative norm ≤ {NOT_SHARED_RELATIVE} and weight cosine ≥ {NOT_SHARED_COSINE}",
        },
        "total": _figures(total, names),
        "layers": layers,
        "outside_layers": outside,
        "skipped": inspection.skipped,
    }


def _runs(layers: list[int], flagged: Callable[[int], bool]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layers where ``flagged`` holds: ``[(first, last), ...]``."""
    runs: list[tuple[int, int]] = []
    for layer in layers:
        if not flagged(layer):
            continue
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _span(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


KIND_WORDS = {"attention": "attention", "mlp": "MLP", "norm": "norms"}


def summarize(inspection: Inspection) -> list[str]:
    """The inspection in sentences, most important first."""
    names = short_names(inspection.models)
    total, matrices = inspection.total(), inspection.matrices
    lines = []
    for i, name in enumerate(names):
        relative = float(matrices.relative_norm()[i])
        cosine = float(matrices.base_cosine()[i])
        if total.delta_sq[i] == 0:
            lines.append(f"{name} is identical to the base: its task vector is zero")
        elif not shares_base(relative, cosine):
            lines.append(
                f"{name} does not share the base: its task vector is {relative:.2f} of the "
                f"base's weights (over {NOT_SHARED_RELATIVE:g} is suspect) and its weights have "
                f"cosine {cosine:.2f} with the base's"
            )
        else:
            lines.append(
                f"{name} shares the base: task vector {relative:.3f} of the base's weights, "
                f"{float(total.top_share()[i, 0]):.0%} of its mass in its top 1% entries"
            )
    cosines, conflict = total.cosine(), total.conflict()
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if math.isnan(cosines[i, j]):
                continue
            runs = _conflict_runs(inspection, i, j, names)
            where = " throughout" if conflict[i, j] >= CONFLICT_NOTABLE and not runs else ""
            lines.append(
                f"{names[i]} and {names[j]}: cosine {cosines[i, j]:.2f}, "
                f"{_percent(conflict[i, j])} of top-20% signs disagree{where}"
            )
            lines += runs
    for i, name in enumerate(names):
        if total.delta_sq[i] > 0 and inspection.layers:
            lines.append(_most_changed(inspection, i, name))
    if total.recipe:
        lines += _recipe_lines(inspection, names)
    if inspection.skipped:
        lines.append(
            f"{len(inspection.skipped)} tensors left out (not in every model, or shapes "
            f"differ): {inspection.skipped[0]}{', ...' if len(inspection.skipped) > 1 else ''}"
        )
    return lines


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def _conflict_runs(inspection: Inspection, i: int, j: int, names: list[str]) -> list[str]:
    lines = []
    for kind in ("attention", "mlp"):

        def flagged(layer: int, kind: str = kind) -> bool:
            rate = inspection.layer(layer, kind).conflict()[i, j]
            return bool(rate >= CONFLICT_NOTABLE)

        runs = _runs(inspection.layers, flagged)
        if runs == [(inspection.layers[0], inspection.layers[-1])]:
            continue  # every layer: the pair's overall line says it
        for first, last in runs:
            sums = inspection.layer_range(first, last, kind)
            lines.append(
                f"  {names[i]} and {names[j]} conflict in {_span(first, last)} "
                f"{KIND_WORDS[kind]}: {_percent(sums.conflict()[i, j])} of top-20% signs disagree"
            )
    return lines


def _most_changed(inspection: Inspection, i: int, name: str) -> str:
    ranked = []
    for (layer, kind), sums in inspection.groups.items():
        if layer is not None and kind in ("attention", "mlp"):
            ranked.append((float(sums.relative_norm()[i]), layer, kind))
    ranked.sort(key=lambda r: (-np.nan_to_num(r[0], nan=-1.0), r[1]))
    top = ", ".join(
        f"layer {layer} {KIND_WORDS[kind]} ({value:.3f})" for value, layer, kind in ranked[:3]
    )
    return f"{name} changed most (relative norm) in {top}"


def _recipe_lines(inspection: Inspection, names: list[str]) -> list[str]:
    total = inspection.total()
    retained = total.retained()
    lines = []
    if not np.all(np.isnan(retained)):
        kept = ", ".join(f"{_percent(r)} of {n}'s" for n, r in zip(names, retained, strict=True))
        lines.append(f"{inspection.method} keeps {kept} task vector (by squared norm)")
    interference = total.interference()
    if math.isnan(interference):
        lines.append("interference: n/a (plain task arithmetic of these task vectors is zero)")
        return lines
    lines.append(
        f"interference {interference:.2f}: the merged change differs from plain task "
        f"arithmetic by {interference:.0%} of its size"
    )
    worst = _runs(
        inspection.layers,
        lambda layer: bool(inspection.layer(layer).interference() >= INTERFERENCE_NOTABLE),
    )
    for first, last in worst:
        sums = inspection.layer_range(first, last)
        lines.append(f"  interference {sums.interference():.2f} in {_span(first, last)}")
    return lines
