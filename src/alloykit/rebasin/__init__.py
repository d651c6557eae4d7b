"""Permutation alignment of independently trained models (Git Re-Basin).

Ainsworth, Hayase and Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation
Symmetries", ICLR 2023, arXiv:2209.04836: weight matching (Algorithm 1) and MergeMany
(Algorithm 3); Jordan et al. 2023, "REPAIR", arXiv:2211.08403, for the merged model's
activation statistics.

Modules: ``spec`` (permutation specs, applying permutations, YAML specs), ``infer`` (specs
inferred for MLPs, CNNs and transformer blocks), ``matching`` (weight matching, MergeMany),
``repair`` (BatchNorm reset, REPAIR) and ``align`` (the ``alloykit align`` verbs: read, align,
write).
"""

from __future__ import annotations

from alloykit.rebasin.align import AlignOptions, AlignResult, align, align_many
from alloykit.rebasin.infer import infer_spec
from alloykit.rebasin.matching import MatchResult, MergeManyResult, merge_many, weight_matching
from alloykit.rebasin.repair import repair, reset_batchnorm
from alloykit.rebasin.spec import (
    AxisPermutation,
    PermutationSpec,
    SpecError,
    apply_permutations,
    load_spec,
)

__all__ = [
    "AlignOptions",
    "AlignResult",
    "AxisPermutation",
    "MatchResult",
    "MergeManyResult",
    "PermutationSpec",
    "SpecError",
    "align",
    "align_many",
    "apply_permutations",
    "infer_spec",
    "load_spec",
    "merge_many",
    "repair",
    "reset_batchnorm",
    "weight_matching",
]
