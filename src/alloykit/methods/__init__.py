"""The merge-method registry: every method alloykit knows, by its MergeKit name.

Each row is a :class:`Method` (kernel, parameters, base handling, citation). Task-vector
methods are presets of the same three steps (sparsify, elect, combine) in
:mod:`alloykit.methods.task_vectors`; a preset fixes the steps and MergeKit's defaults. Look
methods up with :func:`get_method`, which names the known ones when a name is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from alloykit.errors import ConfigError, did_you_mean
from alloykit.methods.data_aware import run_fisher, run_regmean
from alloykit.methods.extrapolate import run_expo
from alloykit.methods.fusion import run_arcee_fusion, run_nearswap
from alloykit.methods.linear import run_linear
from alloykit.methods.masks import run_consensus, run_magmax
from alloykit.methods.model_stock import run_model_stock
from alloykit.methods.passthrough import exactly_one_model, run_passthrough
from alloykit.methods.pcb import run_pcb
from alloykit.methods.ram import run_ram, run_ramplus_tl
from alloykit.methods.registry import Method, MethodInputs, Param, Property
from alloykit.methods.sce import run_sce
from alloykit.methods.spectral import run_iso_c, run_iso_cts, run_tsv
from alloykit.methods.spherical import (
    multislerp_weights_must_not_cancel,
    run_karcher,
    run_multislerp,
    run_nuslerp,
    run_slerp,
)
from alloykit.methods.task_vectors import (
    INVERSE_DELLA,
    ZERO_WEIGHT_SUM,
    Rescale,
    Sparsifier,
    Steps,
    della_bounds_problem,
    merge_deltas,
)

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
DENSITY = Param(
    "density",
    default=1.0,
    per_model=True,
    low=0.0,
    high=1.0,
    doc="fraction of the task vector kept (1: all)",
)
GAMMA = Param(
    "gamma",
    default=0.01,
    per_model=True,
    low=0.0,
    high=1.0,
    doc="fraction of the largest-magnitude entries dropped as outliers",
)
EPSILON = Param(
    "epsilon",
    default=0.15,
    per_model=True,
    low=0.0,
    high=1.0,
    doc="DELLA: keep probabilities run from density − epsilon (smallest) to density + epsilon",
)
LAMBDA = Param("lambda", default=1.0, doc="scales the combined task vector")
DELTA_NORM = Param(
    "delta_norm",
    default="none",
    kind="choice",
    choices=("none", "l1", "l2"),
    doc="scale task vectors to their mean norm first, for fine-tunes of very different lengths",
)
COMBINE = Param(
    "combine",
    default="sum",
    kind="choice",
    choices=("sum", "mean"),
    doc="sum (divided by the agreeing weights when normalize) or mean of the agreeing models",
)
RESCALE_MODE = Param(
    "rescale_mode",
    default="l1",
    kind="choice",
    choices=("l1", "inverse"),
    doc="with rescale: match the L1 norm (MergeKit) or divide by density (the DARE paper)",
)


@dataclass(frozen=True)
class Preset:
    """What a task-vector preset fixes; the rest comes from its parameters."""

    sparsify: Sparsifier
    elect: bool  # whether the preset elects signs (then `elect` chooses mass or count)


def run_task_vectors(inputs: MethodInputs, *, preset: Preset) -> torch.Tensor:
    """Registry adapter for every task-vector preset: the three steps on a job's inputs."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    deltas = inputs.tensors.sub_(inputs.base)  # in place: the stack is this call's own
    return run_on_task_vectors(replace(inputs, tensors=deltas), preset=preset)


def run_on_task_vectors(inputs: MethodInputs, *, preset: Preset) -> torch.Tensor:
    """:func:`run_task_vectors` on task vectors already taken: ``inputs.tensors`` holds
    ``δ_i = x_i − base`` (overwritten), ``inputs.base`` the base. The same operations in the
    same order as the adapter after its subtraction, so the result is the same bits; a recipe
    search uses it with task vectors computed once and cached (:mod:`alloykit.search.cache`).
    """
    assert inputs.base is not None
    steps = preset_steps(preset, inputs.params)
    combined = merge_deltas(
        inputs.tensors,
        inputs.per_model["weight"],
        steps,
        inputs.per_model.get("density"),
        inputs.per_model.get("gamma"),
        inputs.generator,
        inputs.per_model.get("epsilon"),
        model_thresholds(inputs.per_model),
    )
    return combined.add_(inputs.base)


def preset_steps(preset: Preset, params: Mapping[str, Any]) -> Steps:
    """The steps a preset runs with one tensor's resolved global parameters."""
    rescale: Rescale = "none"
    if preset.sparsify != "none" and params["rescale"]:
        rescale = params["rescale_mode"]
    return Steps(
        sparsify=preset.sparsify,
        elect=params["elect"] if preset.elect else "none",
        combine=params["combine"],
        normalize=bool(params["normalize"]),
        scale=float(params["lambda"]),
        rescale=rescale,
        delta_norm=params["delta_norm"],
    )


def task_vector_preset(method: Method) -> Preset | None:
    """The sparsify/elect/combine preset a registry row runs, or None for other methods."""
    run = method.run
    if isinstance(run, partial) and run.func is run_task_vectors:
        preset = run.keywords["preset"]
        assert isinstance(preset, Preset)
        return preset
    return None


def model_thresholds(
    per_model: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Model-wide top-k's per-model threshold and tie quota, when the prepass set them."""
    if "threshold" not in per_model:
        return None
    return per_model["threshold"], per_model["tie_quota"]


DENSITY_SCOPE = Param(
    "density_scope",
    default="tensor",
    kind="choice",
    choices=("tensor", "model"),
    doc="top-k within each tensor (MergeKit) or over the whole model (the TIES paper's code)",
)


def task_vector_method(
    name: str,
    *,
    sparsify: Sparsifier,
    elect: bool,
    normalize: bool,
    rescale: bool,
    summary: str,
    formula: str,
    citation: str,
    elect_default: str = "mass",
    combine_default: str = "sum",
) -> Method:
    """A registry row for a preset of the three steps, with MergeKit's parameters and defaults."""
    params = [WEIGHT]
    if sparsify != "none":
        params.append(DENSITY)
    if sparsify == "breadcrumbs":
        params.append(GAMMA)
    if sparsify == "della":
        params.append(EPSILON)
    if sparsify == "magnitude":
        params.append(DENSITY_SCOPE)
    if elect:
        params.append(
            Param(
                "elect",
                default=elect_default,
                kind="choice",
                choices=("mass", "count"),
                doc="sign election: by total weighted mass (TIES) or by model count (PEFT)",
            )
        )
    params += [
        LAMBDA,
        Param(
            "normalize",
            default=normalize,
            kind="bool",
            doc="divide by the sum of the (agreeing) weights",
        ),
    ]
    if sparsify != "none":
        params.append(
            Param("rescale", default=rescale, kind="bool", doc="rescale the kept entries")
        )
        params.append(RESCALE_MODE)
    combine = COMBINE if combine_default == "sum" else replace(COMBINE, default=combine_default)
    params += [combine, DELTA_NORM, INT8_MASK]
    return Method(
        name=name,
        run=partial(run_task_vectors, preset=Preset(sparsify, elect)),
        params=tuple(params),
        base="required",
        summary=summary,
        formula=formula,
        citation=citation,
        check=_della_check if sparsify == "della" else None,
        properties=_task_vector_properties(sparsify, normalize),
    )


def _task_vector_properties(sparsify: Sparsifier, normalize: bool) -> frozenset[Property]:
    """Identical models (base included) give zero task vectors, so every preset returns the
    model; a constant is kept likewise. Order matters only where draws are made per model."""
    properties: set[Property] = {"idempotent", "constant"}
    if sparsify not in ("random", "della"):
        properties.add("symmetric")
    return frozenset(properties)


def _della_check(
    per_model: Mapping[str, tuple[float, ...]], params: Mapping[str, Any]
) -> str | None:
    """DELLA's keep probabilities density ± epsilon must be probabilities (MergeKit's rule)."""
    if params.get("rescale") and params.get("rescale_mode") == "inverse":
        return INVERSE_DELLA
    for i, (density, epsilon) in enumerate(
        zip(per_model["density"], per_model["epsilon"], strict=True)
    ):
        problem = della_bounds_problem(density, epsilon)
        if problem:
            return f"model {i + 1}: {problem}"
    return None


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


# ram's global threshold: a different parameter from della's per-model epsilon, declared apart.
RAM_EPSILON = Param(
    "epsilon",
    default=1e-5,
    low=0.0,
    doc="a task-vector entry counts as changed when its magnitude exceeds this",
)
RAM = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (Reinforced Agent Merging, RAM/RAM+), arXiv:2601.13572; MergeKit's ram and ramplus_tl"
TIES = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708"
DARE = "Yu et al. 2023, Language Models are Super Mario (DARE), arXiv:2311.03099"
DELLA = "Deep et al. 2024, DELLA-Merging (MagPrune), arXiv:2406.11617"
BREADCRUMBS = "Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795"
TASK_VECTOR = "u_i = w_i·{sparse}(x_i − base)"
ISO = "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces (ICML), arXiv:2502.04959"
SPECTRAL_ALPHA = Param(
    "alpha", default=1.0, doc="scales the merged task vector (tuned on validation)"
)

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
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="weighted average of the models' weights (model soup)",
            formula="out = Σ w_i·x_i / Σ w_i   (no division when normalize: false)",
            citation="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
        ),
        Method(
            name="slerp",
            run=run_slerp,
            params=(
                Param(
                    "t",
                    low=0.0,
                    high=1.0,
                    doc="interpolation factor: 0 is the base, 1 the other model",
                ),
            ),
            base="required",
            max_models=1,
            properties=frozenset({"idempotent", "constant"}),
            summary="spherical interpolation between the base and one other model",
            formula="θ = angle(base, x); out = sin((1−t)θ)/sin θ·base + sin(tθ)/sin θ·x  (lerp when |cos θ| > 0.9995)",
            citation="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); MergeKit's slerp",
        ),
        Method(
            name="nuslerp",
            run=run_nuslerp,
            params=(
                replace(WEIGHT, doc="the model's share of the interpolation: t = w_2/(w_1 + w_2)"),
                Param(
                    "nuslerp_row_wise",
                    default=False,
                    kind="bool",
                    doc="without nuslerp_flatten: interpolate each column (dim 0), not each row",
                ),
                Param(
                    "nuslerp_flatten",
                    default=True,
                    kind="bool",
                    doc="treat the whole tensor as one vector (false: one vector per row)",
                ),
            ),
            base="optional",
            summary="slerp of two models, or of their task vectors around a base; t from their weights",
            formula="t = w_2/(w_1 + w_2); θ = angle(x_1, x_2); out = base + (sin((1−t)θ)·x_1 + sin(tθ)·x_2)/sin θ   (x_i = model_i − base; no base: x_i = model_i)",
            citation="Goddard et al. 2024, Arcee's MergeKit, arXiv:2403.13257 (MergeKit's nuslerp); Shoemake 1985",
            min_models=2,
            max_models=2,
            properties=frozenset({"idempotent", "constant", "symmetric"}),
        ),
        Method(
            name="multislerp",
            run=run_multislerp,
            params=(
                replace(WEIGHT, doc="the model's weight in the mean direction and the mean norm"),
                Param(
                    "normalize_weights",
                    default=True,
                    kind="bool",
                    doc="divide the weights by their sum",
                ),
                Param(
                    "eps",
                    default=1e-8,
                    low=0.0,
                    doc="added to each norm; a smaller weighted mean direction counts as cancelled",
                ),
            ),
            base="optional",
            check=multislerp_weights_must_not_cancel,
            summary="weighted mean direction on the sphere of any number of models (or task vectors)",
            formula="u_i = x_i/(‖x_i‖ + eps); m = Σ w_i·u_i; out = base + m/‖m‖·Σ w_i·‖x_i‖   (x_i = model_i − base; no base: x_i = model_i)",
            citation="Goddard 2025, Multi-SLERP (goddard.blog; MergeKit's multislerp); Buss & Fillmore 2001, Spherical averages (ACM TOG)",
            properties=frozenset({"idempotent", "constant", "symmetric"}),
        ),
        Method(
            name="karcher",
            run=run_karcher,
            params=(
                Param(
                    "max_iter",
                    default=10,
                    kind="int",
                    low=0,
                    doc="the most Riemannian gradient steps",
                ),
                Param(
                    "tol",
                    default=1e-5,
                    low=0.0,
                    doc="step size that counts as converged; smaller norms and angles are skipped",
                ),
            ),
            base="input",
            summary="Karcher (Riemannian) mean of the models' directions times their mean norm; equal weights",
            formula="u = argmin_(‖u‖=1) Σ_i angle(u, x_i)²  (gradient steps on the sphere); out = u·Σ_i ‖x_i‖/k",
            citation="Karcher 1977, Riemannian center of mass and mollifier smoothing; MergeKit's karcher (its docs cite arXiv:2603.04972)",
            properties=frozenset({"idempotent", "constant", "symmetric"}),
        ),
        Method(
            name="passthrough",
            run=run_passthrough,
            params=(
                Param(
                    "scale",
                    default=1.0,
                    per_model=True,
                    doc="multiplies the copied tensor (e.g. 0 for o_proj of a repeated layer)",
                ),
            ),
            base="input",
            check=exactly_one_model,
            properties=frozenset({"idempotent", "constant"}),
            summary="copy one model's tensors: layer stacking and frankenmerges with slices",
            formula="out = scale·x",
            citation="Kim et al. 2023, SOLAR 10.7B depth up-scaling, arXiv:2312.15166; MergeKit's passthrough",
        ),
        task_vector_method(
            "task_arithmetic",
            sparsify="none",
            elect=False,
            normalize=False,
            rescale=False,
            summary="add weighted task vectors (fine-tune minus base) to the base",
            formula="out = base + λ·Σ w_i·(x_i − base)   (/ Σ w_i when normalize: true)",
            citation="Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
        ),
        task_vector_method(
            "ties",
            sparsify="magnitude",
            elect=True,
            normalize=True,
            rescale=False,
            summary="trim task vectors to their largest entries, elect signs, merge the agreeing",
            formula=f"{TASK_VECTOR.format(sparse='topk')}; s = sign(Σ u_i); out = base + λ·Σ_(sign u_i = s) u_i / Σ_(agreeing) w_i",
            citation=TIES,
        ),
        task_vector_method(
            "magnitude_prune",
            sparsify="magnitude",
            elect=False,
            normalize=False,
            rescale=False,
            summary="trim task vectors to their largest entries, then add them (no sign election)",
            formula=f"{TASK_VECTOR.format(sparse='topk')}; out = base + λ·Σ u_i",
            citation=TIES + " (the trim step alone, as in PEFT's magnitude_prune)",
        ),
        task_vector_method(
            "dare_ties",
            sparsify="random",
            elect=True,
            normalize=False,
            rescale=True,
            summary="drop task-vector entries at random and rescale (DARE), then TIES sign election",
            formula=f"{TASK_VECTOR.format(sparse='drop_p')}; s = sign(Σ u_i); out = base + λ·Σ_(sign u_i = s) u_i",
            citation=DARE,
        ),
        task_vector_method(
            "dare_linear",
            sparsify="random",
            elect=False,
            normalize=False,
            rescale=True,
            summary="drop task-vector entries at random and rescale (DARE), then add them",
            formula=f"{TASK_VECTOR.format(sparse='drop_p')}; out = base + λ·Σ u_i",
            citation=DARE,
        ),
        task_vector_method(
            "della",
            sparsify="della",
            elect=True,
            normalize=True,
            rescale=True,
            summary="drop task-vector entries at random, larger ones kept more often (DELLA), then TIES election",
            formula=f"{TASK_VECTOR.format(sparse='magprune_(d±ε)')}; s = sign(Σ u_i); out = base + λ·Σ_(sign u_i = s) u_i / Σ_(agreeing) w_i",
            citation=DELLA,
        ),
        task_vector_method(
            "della_linear",
            sparsify="della",
            elect=False,
            normalize=False,
            rescale=True,
            summary="DELLA's magnitude-ranked drop and rescale, then a weighted sum",
            formula=f"{TASK_VECTOR.format(sparse='magprune_(d±ε)')}; out = base + λ·Σ u_i",
            citation=DELLA,
        ),
        task_vector_method(
            "breadcrumbs",
            sparsify="breadcrumbs",
            elect=False,
            normalize=False,
            rescale=False,
            summary="drop the smallest and the largest task-vector entries, then add them",
            formula=f"{TASK_VECTOR.format(sparse='mask_(gamma, density)')}; out = base + λ·Σ u_i",
            citation=BREADCRUMBS,
        ),
        task_vector_method(
            "breadcrumbs_ties",
            sparsify="breadcrumbs",
            elect=True,
            normalize=False,
            rescale=False,
            summary="breadcrumbs masks, then TIES sign election",
            formula=f"{TASK_VECTOR.format(sparse='mask_(gamma, density)')}; s = sign(Σ u_i); out = base + λ·Σ_(sign u_i = s) u_i",
            citation=BREADCRUMBS + "; " + TIES,
        ),
        Method(
            name="model_stock",
            run=run_model_stock,
            params=(
                Param(
                    "filter_wise",
                    default=False,
                    kind="bool",
                    doc="one ratio per row (last dimension) instead of one per tensor",
                ),
            ),
            base="required",
            min_models=2,
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="move from the base toward the fine-tunes' average as far as they agree",
            formula="cos θ = mean_(i<j) cos(x_i − base, x_j − base); t = N·cos θ / (1 + (N−1)·cos θ); out = t·mean(x_i) + (1−t)·base",
            citation="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models, arXiv:2403.19522",
        ),
        Method(
            name="sce",
            run=run_sce,
            params=(
                Param(
                    "select_topk",
                    default=1.0,
                    low=0.0,
                    high=1.0,
                    doc="fraction of the positions (by variance over the models) kept (1: all)",
                ),
                INT8_MASK,
            ),
            base="required",
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="keep high-variance positions, weight task vectors by mean square, TIES election",
            formula="δ_i = (x_i − base)·topk_τ(Var_i δ); s_i = mean(δ_i²)/Σ_j mean(δ_j²); m_i = [sign δ_i = sign Σ_j δ_j]; out = base + Σ s_i·m_i·δ_i / max(Σ s_i·m_i, 1e-6)",
            citation="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE), arXiv:2408.07990",
        ),
        Method(
            name="ram",
            run=run_ram,
            params=(RAM_EPSILON,),
            base="required",
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="sum the changes only one model made, average the changes several made",
            formula="a_i = |x_i − base| > ε; c = Σ a_i; out = base + Σ a_i·(x_i − base) / (c if c > 1 else 1)",
            citation=RAM,
        ),
        Method(
            name="ramplus_tl",
            run=run_ramplus_tl,
            params=(
                Param(
                    "r",
                    default=0.1,
                    doc="how strongly a model's unique changes are amplified",
                ),
                Param(
                    "alpha",
                    default=0.2,
                    low=0.0,
                    doc="cap on the ratio of a model's shared to unique changes",
                ),
                RAM_EPSILON,
            ),
            base="required",
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="RAM with each model's unique changes scaled up by how much it shares (per tensor)",
            formula="ρ_i = |a_i ∧ shared| / max(|a_i ∧ unique|, ε); λ_i = 1 + r·clamp(ρ_i, 0, α); as ram, unique changes times λ_i",
            citation=RAM,
        ),
        Method(
            name="nearswap",
            run=run_nearswap,
            params=(
                Param(
                    "t",
                    low=0.0,
                    doc="closeness threshold: entries within t of the base take the other model",
                ),
            ),
            base="required",
            max_models=1,
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="take the other model where it is close to the base, blend less the farther it is",
            formula="w = clamp(t / max(|base − x|, 1e-6), 0, 1); out = w·x + (1−w)·base",
            citation="alchemonaut 2024, QuartetAnemoi-70B-t0.0001 model card (NearSwap); MergeKit's nearswap",
        ),
        Method(
            name="arcee_fusion",
            run=run_arcee_fusion,
            params=(),
            base="required",
            max_models=1,
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="keep only the other model's outstanding changes (importance above median + 1.5 IQR)",
            formula="I = |x − base|·KL_row(softmax x ‖ softmax base); out = base + (x − base)·[I ≥ median(I) + 1.5·IQR(I)]",
            citation="Arcee AI 2025, Arcee Fusion (MergeKit's arcee_fusion)",
        ),
        Method(
            name="expo",
            run=run_expo,
            params=(
                Param(
                    "alpha",
                    default=0.1,
                    doc="extrapolation strength: 0 returns the fine-tune, larger goes further",
                ),
            ),
            base="required",
            summary="extrapolate past one fine-tune, away from its base (alignment boost)",
            formula="out = x + α·(x − base)",
            citation="Zheng et al. 2024, Weak-to-Strong Extrapolation Expedites Alignment (ExPO), arXiv:2404.16792",
            min_models=1,
            max_models=1,
            properties=frozenset({"idempotent", "constant"}),
        ),
        Method(
            name="magmax",
            run=run_magmax,
            params=(
                Param(
                    "lambda",
                    default=0.5,
                    doc="scales the selected task vector (the paper's reproduction setting: 0.5)",
                ),
            ),
            base="required",
            summary="per element, the task-vector entry of largest magnitude, scaled",
            formula="τ_i = x_i − base; t* = argmax_i |τ_i| per element; out = base + λ·τ_t*",
            citation="Marczak et al. 2024, MagMax: Leveraging Model Merging for Seamless Continual Learning (ECCV), arXiv:2407.06322",
            min_models=1,
            properties=frozenset({"idempotent", "constant", "symmetric"}),
        ),
        Method(
            name="consensus",
            run=run_consensus,
            params=(
                replace(WEIGHT, default=1.0),
                Param(
                    "tall_lambda",
                    default=0.6,
                    per_model=True,
                    low=0.0,
                    doc="TALL-mask threshold: keep entries where |u_t| ≥ tall_lambda·|Σu − u_t|",
                ),
                Param(
                    "k",
                    default=2,
                    kind="int",
                    low=0,
                    doc="keep an entry only where at least k TALL masks select it",
                ),
                LAMBDA,
            ),
            base="required",
            summary="task arithmetic on the entries that at least k tasks' TALL masks select",
            formula="u_i = w_i·(x_i − base); m_i = |u_i| ≥ λ_i·|Σu − u_i|; out = base + λ·[Σ m_i ≥ k]·Σ u_i",
            citation="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression (ICML), arXiv:2405.07813",
            min_models=2,
            properties=frozenset({"idempotent", "constant"}),
        ),
        Method(
            name="pcb",
            run=run_pcb,
            params=(
                replace(WEIGHT, default=1.0),
                Param(
                    "pcb_ratio",
                    default=0.1,
                    low=0.0,
                    high=1.0,
                    doc="share of each task's entries kept, by PCB score (the authors: 0.05-0.2)",
                ),
                Param(
                    "clamp_ratio",
                    default=0.0001,
                    low=0.0,
                    high=0.5,
                    doc="share of each task's smallest and largest magnitudes clipped first",
                ),
                LAMBDA,
            ),
            base="required",
            summary="task vectors weighted per entry by intra- and inter-task competition scores",
            formula="β_i = exp(k·minmax|τ_i|²)·tanh(τ_i·Σ τ_j); s_i = minmax(top-r of β_i); out = base + λ·Σ w_i·s_i·τ_i / Σ s_i",
            citation="Du et al. 2024, Parameter Competition Balancing for Model Merging (NeurIPS), arXiv:2410.02396",
            min_models=1,
            properties=frozenset({"constant", "symmetric"}),
        ),
        Method(
            name="regmean",
            run=run_regmean,
            params=(
                Param(
                    "alpha",
                    default=0.9,
                    low=0.0,
                    high=1.0,
                    doc="share of the Gram matrices' off-diagonal terms kept (1: exact least squares)",
                ),
            ),
            base="optional",
            statistics="gram",
            min_models=1,
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="per linear layer, the weight that best reproduces every model's outputs on calibration data",
            formula="G̃_i = α·X_iᵀX_i + (1−α)·diag(X_iᵀX_i); W = (Σ G̃_i)⁻¹ Σ G̃_i W_i   (other tensors: mean)",
            citation="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean, ICLR), arXiv:2212.09849",
        ),
        Method(
            name="fisher",
            run=run_fisher,
            params=(
                replace(WEIGHT, default=1.0, doc="the model's coefficient c_i"),
                Param(
                    "epsilon",
                    default=1e-6,
                    low=0.0,
                    doc="added to every Fisher value; parameters no data reached get the mean",
                ),
                Param(
                    "normalize",
                    default=False,
                    kind="bool",
                    doc="scale each model's Fisher to unit L2 norm over the whole model first",
                ),
            ),
            base="optional",
            statistics="fisher",
            min_models=1,
            properties=frozenset({"idempotent", "constant", "symmetric"}),
            summary="per parameter, an average weighted by each model's Fisher information on calibration data",
            formula="F_i = E_x E_(y~p_i)[(∂ log p_i(y|x)/∂θ)²] (/ ‖F_i‖ when normalize); out = Σ c_i·(F_i + ε)·x_i / Σ c_i·(F_i + ε)",
            citation="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS), arXiv:2111.09832",
        ),
        Method(
            name="tsv",
            run=run_tsv,
            params=(SPECTRAL_ALPHA,),
            base="required",
            summary="per matrix, each task's top singular vectors, orthogonalised across tasks (TSV-M)",
            formula="τ_i = U_i S_i V_iᵀ, top ⌊r/T⌋ each; out = base + α·⊥[U_1..U_T]·diag(S)·⊥[V_1..V_T]ᵀ  (not 2-D: base + α·mean τ_i)",
            citation="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR), arXiv:2412.00081",
            min_models=1,
            properties=frozenset({"idempotent", "constant"}),
        ),
        Method(
            name="iso_c",
            run=run_iso_c,
            params=(SPECTRAL_ALPHA,),
            base="required",
            summary="per matrix, the task-arithmetic sum with a flat singular spectrum (Iso-C)",
            formula="Σ τ_i = U S Vᵀ; out = base + α·mean(S)·U Vᵀ  (not 2-D: base + α·mean τ_i)",
            citation=ISO,
            min_models=1,
            properties=frozenset({"idempotent", "constant"}),
        ),
        Method(
            name="iso_cts",
            run=run_iso_cts,
            params=(
                SPECTRAL_ALPHA,
                Param(
                    "common_space_fraction",
                    default=0.8,
                    low=0.0,
                    high=1.0,
                    doc="share of the singular directions taken from the sum (the common space)",
                ),
            ),
            base="required",
            summary="Iso-C's common subspace plus task-specific subspaces, flat spectrum (Iso-CTS)",
            formula="U_c = top k_c of Σ τ_i; task i: top k of (I − U_c U_cᵀ)τ_i; out = base + α·mean(S)·⊥[U]·⊥[V]ᵀ  (not 2-D: base + α·mean τ_i)",
            citation=ISO,
            min_models=1,
            properties=frozenset({"idempotent", "constant"}),
        ),
    )
}


STEP_CHOICES = {
    "sparsify": ("none", "magnitude", "random", "breadcrumbs", "della"),
    "elect": ("none", "mass", "count"),
    "combine": ("sum", "mean"),
}


def compose_method(steps: Mapping[str, Any]) -> Method:
    """A task-vector method from named steps: ``{sparsify: magnitude, elect: count, combine: mean}``.

    Each step defaults to ``none`` (``sum`` for combine). Defaults of the other parameters follow
    the closest preset: ``normalize`` is true when signs are elected (as in ties), ``rescale``
    true for ``random`` (as in DARE). Raises ConfigError naming each bad key or value.
    """
    problems = []
    for key, value in steps.items():
        where = f"merge_method.{key}"
        if key not in STEP_CHOICES:
            problems.append(
                f"{where}: unknown step{did_you_mean(str(key), STEP_CHOICES)}; steps are sparsify, elect, combine"
            )
        elif value not in STEP_CHOICES[key]:
            problems.append(f"{where}: '{value}' is not one of {', '.join(STEP_CHOICES[key])}")
    if problems:
        raise ConfigError(problems)
    sparsify = steps.get("sparsify", "none")
    elect = steps.get("elect", "none")
    combine = steps.get("combine", "sum")
    name = f"task_vectors(sparsify={sparsify}, elect={elect}, combine={combine})"
    return task_vector_method(
        name,
        sparsify=sparsify,
        elect=elect != "none",
        normalize=elect != "none",
        rescale=sparsify in ("random", "della"),
        summary="a composition of the task-vector steps",
        formula=f"out = base + λ·{combine}_{elect}(w_i·{sparsify}(x_i − base))",
        citation="the steps' papers: " + "; ".join((TIES, DARE, BREADCRUMBS, DELLA)),
        elect_default=elect if elect != "none" else "mass",
        combine_default=combine,
    )


def resolve_method(spec: str | Mapping[str, Any]) -> Method:
    """The method a config's ``merge_method`` names: a registered name or a step composition."""
    if isinstance(spec, Mapping):
        return compose_method(spec)
    return get_method(spec)


def get_method(name: str) -> Method:
    """The registry row for ``name``; a ConfigError listing the known names otherwise."""
    method = METHODS.get(name)
    if method is None:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(
            f"merge_method: unknown method '{name}'{did_you_mean(name, METHODS)}; known: {known}"
        )
    return method


__all__ = ["METHODS", "Method", "MethodInputs", "Param", "get_method", "resolve_method"]
