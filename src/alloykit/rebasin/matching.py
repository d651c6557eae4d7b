"""Weight matching and MergeMany: the permutations that align models trained apart.

Weight matching (Ainsworth, Hayase and Srinivasa 2023, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023, arXiv:2209.04836, Algorithm 1) finds, for a model B and a
reference A, the permutations pi maximising sum_l <W_l^A, pi(W_l^B)>. The problem couples
neighbouring layers, so it is solved by coordinate descent: fixing every group but one, the
best permutation of that group is a linear assignment problem, solved exactly (Hungarian /
Jonker-Volgenant via ``scipy.optimize.linear_sum_assignment``).

MergeMany (the paper's Algorithm 3, appendix) aligns N models to each other: each model in
turn is matched to the mean of the others, until a whole round changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alloykit.rebasin.spec import (
    Permutations,
    PermutationSpec,
    apply_permutations,
    identity_permutations,
    permute_tensor,
    unit_view,
)

_TOLERANCE = 1e-12  # the smallest objective gain that counts as progress


@dataclass(frozen=True)
class MatchResult:
    """The permutations found, the rounds of coordinate descent run, and whether it converged."""

    perms: Permutations
    rounds: int
    converged: bool


def _solve_assignment(scores: torch.Tensor) -> torch.Tensor:
    """The permutation maximising ``sum_i scores[i, index[i]]`` (an exact linear assignment)."""
    from scipy.optimize import linear_sum_assignment

    rows, columns = linear_sum_assignment(scores.numpy(), maximize=True)
    index = np.empty(len(rows), dtype=np.int64)
    index[rows] = columns
    return torch.from_numpy(index)


def weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    init: Permutations | None = None,
) -> MatchResult:
    """Permutations of ``model``'s units that best match ``reference``'s weights.

    Ainsworth et al. 2023 (arXiv:2209.04836), Algorithm 1: start from ``init`` (identity);
    each round visits the groups in a seeded random order and replaces group p's permutation by
    the solution of the linear assignment problem

        max_P <C_p, P>,  C_p = sum over (tensor W, axis a) permuted by p of
                               W^A_(a) (pi_{-p}(W^B))_(a)^T,

    where ``X_(a)`` is X with axis a moved first and flattened to one row per unit, and
    ``pi_{-p}`` applies every other group's current permutation. Rounds stop when none improves
    the objective, or after ``max_iter``. Arithmetic is float64, so the result does not depend
    on the inputs' dtype beyond their values.

    Args:
        spec: the permutation groups and the tensor axes they act on.
        reference: model A's tensors (at least those ``spec`` names).
        model: model B's tensors, same names and shapes.
        seed: seeds the order in which groups are visited.
        max_iter: the most rounds of coordinate descent.
        init: starting permutations (default: identity).

    Returns:
        A :class:`MatchResult`; ``apply_permutations(spec, result.perms, model)`` is B aligned to A.

    Example:
        >>> from alloykit.rebasin.spec import AxisPermutation
        >>> spec = PermutationSpec({"h": 3}, {"w": (AxisPermutation("h"), None)})
        >>> a = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        >>> weight_matching(spec, {"w": a}, {"w": a[[2, 0, 1]]}).perms["h"].tolist()
        [1, 2, 0]
    """
    # float64 copies are made per use, not kept: memory stays at the two models as given
    uses = {perm: spec.uses(perm) for perm in spec.sizes}
    perms = dict(init) if init is not None else identity_permutations(spec)
    order_rng = np.random.default_rng(seed)
    groups = sorted(spec.sizes)
    rounds = 0
    for rounds in range(1, max_iter + 1):
        improved = False
        for index in order_rng.permutation(len(groups)):
            perm = groups[index]
            units = spec.sizes[perm]
            scores = torch.zeros(units, units, dtype=torch.float64)
            for name, axis, placement in uses[perm]:
                ours = unit_view(reference[name].to(torch.float64), axis, placement, units)
                theirs = permute_tensor(name, model[name], spec, perms, except_axis=axis)
                scores += ours @ unit_view(theirs.to(torch.float64), axis, placement, units).T
            best = _solve_assignment(scores)
            diagonal = torch.arange(units)
            gain = scores[diagonal, best].sum() - scores[diagonal, perms[perm]].sum()
            if gain > _TOLERANCE:
                perms[perm] = best
                improved = True
        if not improved:
            return MatchResult(perms, rounds, converged=True)
    return MatchResult(perms, rounds, converged=False)


def _compose(first: Permutations, then: Permutations) -> Permutations:
    """The permutations that apply ``first`` and then ``then`` (``x[first][then]``)."""
    return {perm: first[perm][then[perm]] for perm in first}


def mean_state(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The element-wise (weighted) mean of state dicts, float64 for floating tensors.

    ``weights`` default to 1/N each. Integer tensors (BatchNorm's ``num_batches_tracked``)
    are taken from the first model.
    """
    weights = weights if weights is not None else [1 / len(states)] * len(states)
    merged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            total = torch.zeros(first.shape, dtype=torch.float64)
            for state, weight in zip(states, weights, strict=True):
                total += weight * state[name].to(torch.float64)
            merged[name] = total
        else:
            merged[name] = first
    return merged


@dataclass(frozen=True)
class MergeManyResult:
    """Each model's permutations (into the common unit order), the aligned models, rounds run."""

    perms: list[Permutations]
    aligned: list[dict[str, torch.Tensor]]
    rounds: int
    converged: bool

    def mean(self) -> dict[str, torch.Tensor]:
        """The merged model: the mean of the aligned models, in each tensor's input dtype."""
        merged = mean_state(self.aligned)
        return {name: merged[name].to(self.aligned[0][name].dtype) for name in merged}


def merge_many(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> MergeManyResult:
    """Align N models to a common unit order by matching each to the mean of the others.

    Ainsworth et al. 2023 (arXiv:2209.04836), Appendix, Algorithm 3 (MergeMany): repeat
    { for i in a random order: pi_i = WeightMatching(mean_{j != i} theta_j, theta_i);
    theta_i <- pi_i(theta_i) } until a round leaves every model unchanged (or ``max_iter``
    rounds). The merged model is the mean of the aligned models (:meth:`MergeManyResult.mean`).

    Args:
        spec: the permutation groups, shared by every model.
        models: N >= 2 state dicts with the same names and shapes.
        seed: seeds the model order of each round and each matching's group order.
        max_iter: the most rounds over the models (each matching runs to convergence).
    """
    rng = np.random.default_rng(seed)
    aligned = [dict(m) for m in models]
    cumulative = [identity_permutations(spec) for _ in models]
    rounds = 0
    for rounds in range(1, max_iter + 1):
        changed = False
        for i in rng.permutation(len(models)):
            others = mean_state([aligned[j] for j in range(len(models)) if j != i])
            step = weight_matching(spec, others, aligned[i], seed=int(rng.integers(2**31)))
            if any(not torch.equal(p, torch.arange(p.numel())) for p in step.perms.values()):
                aligned[i] = apply_permutations(spec, step.perms, aligned[i])
                cumulative[i] = _compose(cumulative[i], step.perms)
                changed = True
        if not changed:
            return MergeManyResult(cumulative, aligned, rounds, converged=True)
    return MergeManyResult(cumulative, aligned, rounds, converged=False)
