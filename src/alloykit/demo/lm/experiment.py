"""The causal-LM skill-merge table: base, skill experts and merges, exact match per skill.

The DARE paper's shape (Yu et al., 2023, arXiv:2311.03099: experts that keep each other's
skills when merged) on SmolLM2-135M-Instruct and mathematics-dataset skills. Every model is
scored with :func:`alloykit.evaluate` on the skills' exact-match task files; merges are
alloykit merge configs merged in memory (full fine-tunes, and LoRA experts as dense updates)
or adapters merged by :func:`alloykit.lora.merge.merge_adapters` (``alloykit lora merge``) and
applied to the base (``base+adapter``). Each method's parameters are chosen on the validation
splits (mean normalised exact match); the test split is read once per reported cell.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alloykit.demo.experiment import Grid, RecipeSearch, grid_points, recipe_search, rounded
from alloykit.demo.lm.base import LMProtocolError

SPLITS_SCORED = ("validation", "test")


@dataclass
class LMRow:
    """One row: exact match (%) per skill on test, the parameters chosen on validation."""

    name: str
    em: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    val_mean: float = math.nan
    note: str = ""


def normalised(em: Mapping[str, float], own: Mapping[str, float]) -> dict[str, float]:
    """Exact match divided by each skill's own expert's (in %); NaN where the expert scores 0."""
    return {t: 100.0 * v / own[t] if own[t] > 0 else math.nan for t, v in em.items()}


def keeps(em: Mapping[str, float], own: Mapping[str, float], fraction: float = 0.9) -> bool:
    """Whether ``em`` keeps at least ``fraction`` of every skill's own-expert score."""
    return all(em[t] >= fraction * own[t] for t in own)


class Scorer:
    """Scores models on the skills' task files through :func:`alloykit.evaluate`, caching each
    (model, task) score in a JSON file and counting test-split reads."""

    def __init__(
        self, tasks: Mapping[str, Mapping[str, Path]], cache_file: Path, threads: int
    ) -> None:
        self.tasks = tasks
        self.cache_file = cache_file
        self.threads = threads
        self.scores: dict[str, float] = (
            json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        )
        self.test_reads: dict[tuple[str, str], int] = {}

    def score(self, label: str, model: Any, split: str) -> dict[str, float]:
        """Exact match (%) of ``model`` (a folder or a merge-config dict) on every skill."""
        import alloykit

        if split == "test":
            for skill in self.tasks:
                key = (label, skill)
                self.test_reads[key] = self.test_reads.get(key, 0) + 1
        identity = json.dumps(model if isinstance(model, dict) else str(model), sort_keys=True)
        keys = {}
        for skill, files in self.tasks.items():
            task = Path(files[split])
            data = (task.parent / f"{skill}.{split}.jsonl").read_bytes()
            # the data and the task file (prompt, shots, generation settings) key the score
            digest = hashlib.sha256(data + task.read_bytes()).hexdigest()[:10]
            keys[skill] = hashlib.sha256(f"{identity}|{digest}".encode()).hexdigest()[:16]
        missing = [skill for skill, key in keys.items() if key not in self.scores]
        if missing:  # one call: a merge config is merged once for all its tasks
            # merges that sample (DARE, DELLA) draw with seed 0: the same merge every run
            options = alloykit.EvalOptions(
                threads=self.threads, batch_size=32, merge=alloykit.MergeOptions(seed=0)
            )
            results = alloykit.evaluate(model, [self.tasks[s][split] for s in missing], options)
            for skill in missing:
                name = skill if split == "test" else f"{skill}@{split}"  # data.write_tasks
                self.scores[keys[skill]] = 100.0 * results[name]
            self.cache_file.write_text(json.dumps(self.scores, indent=0))
        out = {skill: self.scores[key] for skill, key in keys.items()}
        return out


def merge_config(
    method: str, base: Path, experts: Sequence[Path], params: Mapping[str, Any]
) -> dict[str, Any]:
    """A MergeKit-style config merging ``experts`` over ``base``: ``params`` that the method
    declares per model go to every model (beside ``weight``: 1, or the i-th of a ``weights``
    list), the others to the top level."""
    from alloykit import get_method
    from alloykit.methods import resolve_method

    params = dict(params)
    weights = params.pop("weights", None)
    declared = {p.name: p.per_model for p in get_method(method).params}
    if weights is not None and "weight" not in declared:
        raise LMProtocolError(f"{method} takes no per-model weights")
    if weights is not None and len(weights) != len(experts):
        raise LMProtocolError(f"{method}: {len(weights)} weights for {len(experts)} experts")
    if "weight" in declared:  # methods without weights (model_stock, tsv) get none
        weights = weights or [1.0] * len(experts)
    per_model = {k: v for k, v in params.items() if declared.get(k, True)}
    config: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {
                "model": str(e),
                "parameters": {**({"weight": float(weights[i])} if weights else {}), **per_model},
            }
            for i, e in enumerate(experts)
        ],
        "dtype": "float32",
    }
    if resolve_method(method).base != "input":  # linear averages the experts alone
        config["base_model"] = str(base)
    if len(per_model) < len(params):
        config["parameters"] = {k: v for k, v in params.items() if k not in per_model}
    return config


def adapter_merge(
    cache: Path,
    method: str,
    base: Path,
    adapters: Sequence[Path],
    params: Mapping[str, Any],
    rank: int,
) -> dict[str, Any]:
    """Merge LoRA ``adapters`` into one adapter with ``alloykit lora merge``'s function (cached)
    and return the config of the base with that adapter applied."""
    from alloykit.lora.merge import LoraMergeOptions, merge_adapters

    recipe = merge_config(method, base, adapters, params) | {"rank": rank}
    recipe.pop("dtype")
    name = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    out = cache / "adapter-merges" / f"{method}-{name}"
    if not (out / "adapter_config.json").is_file():
        merge_adapters(recipe, out, LoraMergeOptions(overwrite=True, seed=0))
    return {
        "merge_method": "linear",
        "models": [{"model": f"{base}+{out}", "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }


def run_table(
    scorer: Scorer,
    base: Path,
    experts: Mapping[str, Path],
    methods: Mapping[str, Grid],
    *,
    adapters: Mapping[str, Path] | None = None,
    cache: Path | None = None,
    rank: int = 64,
    fewshot: tuple[str, Scorer] | None = None,
    searches: Mapping[str, RecipeSearch] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[LMRow], dict[str, float]]:
    """Score base, every expert and every method; returns (rows, each expert's own-skill
    exact match). With ``adapters`` (LoRA experts) each method is run twice: on the dense
    experts (``experts``: base with the update folded in) and on the adapters (merged with
    ``lora merge`` to ``rank``). ``fewshot`` (a label and a scorer of few-shot task files)
    adds the base prompted with solved examples; ``searches`` add one row each (``search:
    NAME``): Optuna's TPE over the method's ranges and per-expert weights on validation (the
    dense experts), the best point scored on test once."""
    skills = list(scorer.tasks)
    rows = [LMRow("base", scorer.score("base", base, "test"))]
    if fewshot is not None:
        label, shots = fewshot
        rows.append(LMRow(label, shots.score(label, base, "test")))
    own: dict[str, float] = {}
    for skill, folder in experts.items():
        row = LMRow(f"expert: {skill}", scorer.score(f"expert: {skill}", folder, "test"))
        rows.append(row)
        own[skill] = row.em[skill]
    members = [experts[s] for s in skills]
    routes: list[tuple[str, Callable[[str, dict[str, Any]], Any]]] = [
        ("" if adapters is None else " (dense)", lambda m, p: merge_config(m, base, members, p))
    ]
    if adapters is not None:
        if cache is None:
            raise LMProtocolError("merging adapters needs a cache folder")
        pieces = [adapters[s] for s in skills]
        routes.append(
            (" (lora merge)", lambda m, p: adapter_merge(cache, m, base, pieces, p, rank))
        )
    # validation (of the methods' grids and the searches) is normalised by the experts' own
    # validation scores
    val_own = {
        s: scorer.score(f"val:expert:{s}", experts[s], "validation")[s]
        for s in (skills if methods or searches else [])
    }
    for method, grid in methods.items():
        for suffix, build in routes:
            label = method + suffix
            started = time.perf_counter()
            best: tuple[float, dict[str, Any], Any] = (-math.inf, {}, None)
            try:
                for point in grid_points(grid):
                    model = build(method, point)
                    val = scorer.score(f"val:{label}", model, "validation")
                    value = selection_value(val, val_own)
                    log(f"  {label} {point}: validation {value:.1f}")
                    if value > best[0]:
                        best = (value, point, model)
            except Exception as err:  # a method that cannot merge these models is reported
                rows.append(LMRow(label, {}, note=f"failed: {str(err).splitlines()[0][:120]}"))
                log(f"  {label} failed: {err}")
                continue
            em = scorer.score(label, best[2], "test")
            rows.append(LMRow(label, em, best[1], best[0]))
            log(f"{label}: {em} ({time.perf_counter() - started:.0f} s)")
    for name, spec in (searches or {}).items():
        started = time.perf_counter()
        label = f"search: {name}"

        def objective(point: dict[str, Any], method: str = spec.method, key: str = label) -> float:
            model = merge_config(method, base, members, point)
            return selection_value(scorer.score(f"val:{key}", model, "validation"), val_own)

        value, point = recipe_search(spec, len(members), objective, log)
        em = scorer.score(label, merge_config(spec.method, base, members, point), "test")
        note = f"{spec.method}, TPE {spec.trials} trials on validation"
        rows.append(LMRow(label, em, rounded(point), value, note))
        log(f"{label}: {em} ({time.perf_counter() - started:.0f} s)")
    for counts in (scorer.test_reads, fewshot[1].test_reads if fewshot else {}):
        for (label, skill), count in counts.items():
            if count != 1 or label.startswith("val:"):
                raise LMProtocolError(f"test split of {skill} read {count} times for {label}")
    return rows, own


def selection_value(em: Mapping[str, float], own: Mapping[str, float]) -> float:
    """What validation maximises: the mean normalised exact match over the skills whose
    expert scores above 0, else (no expert scores) the mean exact match."""
    value = _mean(normalised(em, own))
    return sum(em.values()) / len(em) if math.isnan(value) else value


def _mean(values: Mapping[str, float]) -> float:
    finite = [v for v in values.values() if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def format_table(rows: Sequence[LMRow], own: Mapping[str, float]) -> str:
    """Markdown: exact match per skill, mean, normalised per skill and mean, whether every
    skill keeps >= 90% of its expert, the parameters chosen on validation."""
    skills = list(own)
    head = (
        "| model | "
        + " | ".join(skills)
        + " | mean EM | "
        + " | ".join(f"{s} norm" for s in skills)
        + " | mean norm | keeps >= 90% of every expert | chosen on validation |"
    )
    lines = [head, "|" + "---|" * (2 * len(skills) + 5)]
    for row in rows:
        if not row.em:
            lines.append(f"| {row.name} |" + " |" * (2 * len(skills) + 3) + f" {row.note} |")
            continue
        norm = normalised(row.em, own)
        params = ", ".join(f"{k}={v}" for k, v in row.params.items())
        kept = "yes" if keeps(row.em, own) else "no"
        lines.append(
            f"| {row.name} | "
            + " | ".join(f"{row.em[s]:.1f}" for s in skills)
            + f" | {sum(row.em[s] for s in skills) / len(skills):.1f} | "
            + " | ".join(f"{norm[s]:.1f}" for s in skills)
            + f" | {_mean(norm):.1f} | {kept} | {'; '.join(x for x in (params, row.note) if x)} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Difference:
    """One cell that differs between two runs of the table (exact match, in points)."""

    kind: str
    row: str
    skill: str
    old: float
    new: float

    @property
    def points(self) -> float:
        return abs(self.new - self.old)


def table_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Compare two runs' raw tables (the ``.json`` the driver writes beside the Markdown).

    Returns ``cells`` (every test exact-match cell of rows present in both, as
    :class:`Difference`), ``changed`` (those that differ), ``chosen`` (``(kind, row, old
    parameters, new parameters)`` of rows whose parameters chosen on validation differ: a
    changed grid or search, not noise) and ``missing`` (``kind: row`` of rows in one run only).
    """
    cells: list[Difference] = []
    chosen: list[tuple[str, str, Any, Any]] = []
    missing: list[str] = []
    for kind in sorted(set(old["raw"]) | set(new["raw"])):
        before = {r["name"]: r for r in old["raw"].get(kind, {}).get("rows", [])}
        after = {r["name"]: r for r in new["raw"].get(kind, {}).get("rows", [])}
        missing += [f"{kind}: {name}" for name in sorted(set(before) ^ set(after))]
        for name in [n for n in before if n in after]:  # the table's order
            a, b = before[name], after[name]
            if a.get("params") != b.get("params"):
                chosen.append((kind, name, a.get("params"), b.get("params")))
            for skill in sorted(a["em"].keys() & b["em"].keys()):
                cells.append(Difference(kind, name, skill, a["em"][skill], b["em"][skill]))
    changed = [c for c in cells if c.points > 1e-9]
    return {"cells": cells, "changed": changed, "chosen": sorted(chosen), "missing": missing}
