"""Task-vector statistics of one tensor, as sums that add up over tensors, layers and models.

Every figure alloykit reports is a ratio of sums (``‖δ‖² = Σ δ²``, ``δ_i·δ_j``, counts), so the
statistics of a layer, a module kind or the whole model are the sums of its tensors' and the
figures are computed last: a layer's cosine is the cosine of its tensors' task vectors laid end
to end, not an average of per-tensor cosines. :class:`Sums` holds those sums for ``k`` models;
:func:`tensor_sums` computes them for one tensor, in float64.

Definitions (``δ_i = x_i − base``, per tensor, top-k sets ranked by ``|δ_i|`` as in TIES's trim):

- relative norm ``‖δ_i‖ / ‖base‖``; weight cosine ``cos(x_i, base)``;
- pairwise cosine ``δ_i·δ_j / (‖δ_i‖ ‖δ_j‖)``;
- sign conflict: among the entries in both ``δ_i``'s and ``δ_j``'s top 20% by magnitude, the
  share whose signs differ;
- top-mass share: ``‖δ_i restricted to its top p%‖² / ‖δ_i‖²`` for p = 1, 5, 20 (the share of
  the squared L2 norm, the "energy", that the largest entries carry);
- with a recipe: retained share ``‖δ_i on the entries that survive sparsify and elect‖² /
  ‖δ_i‖²`` and interference ``‖merged delta − Σ c_i δ_i‖ / ‖Σ c_i δ_i‖``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

TOP_SHARES = (0.01, 0.05, 0.20)  # top-mass shares reported per task vector
CONFLICT_TOP = 0.20  # sign conflicts are counted among each pair's top 20% magnitudes
# A model does not share the base when its task vector is this large relative to the base's
# weights (half their size; a long fine-tune's is typically under 0.1) ...
NOT_SHARED_RELATIVE = 0.5
# ... or when its weights point this far from the base's (cosine below 0.5).
NOT_SHARED_COSINE = 0.5


def top_count(share: float, numel: int) -> int:
    """How many entries the top ``share`` of ``numel`` holds: ``max(1, int(share·numel))``,
    the sparsify step's rule."""
    return min(numel, max(1, int(share * numel)))


@dataclass
class Sums:
    """Additive statistics of a group of tensors for ``k`` models (arrays indexed by model).

    Pair arrays are ``(k, k)``; ``top_sq`` is ``(k, len(TOP_SHARES))``. ``recipe`` is False until
    :meth:`add_recipe` adds the retained and interference sums of a merge recipe.
    """

    k: int
    numel: int = 0
    tensors: int = 0
    base_sq: float = 0.0
    delta_sq: np.ndarray = field(init=False)
    weight_sq: np.ndarray = field(init=False)
    weight_dot_base: np.ndarray = field(init=False)
    top_sq: np.ndarray = field(init=False)
    pair_dot: np.ndarray = field(init=False)
    pair_top: np.ndarray = field(init=False)
    pair_conflict: np.ndarray = field(init=False)
    retained_sq: np.ndarray = field(init=False)
    interference_sq: float = 0.0
    reference_sq: float = 0.0
    recipe: bool = False

    def __post_init__(self) -> None:
        k = self.k
        self.delta_sq = np.zeros(k)
        self.weight_sq = np.zeros(k)
        self.weight_dot_base = np.zeros(k)
        self.top_sq = np.zeros((k, len(TOP_SHARES)))
        self.pair_dot = np.zeros((k, k))
        self.pair_top = np.zeros((k, k))
        self.pair_conflict = np.zeros((k, k))
        self.retained_sq = np.zeros(k)

    def add(self, other: Sums, models: list[int] | None = None) -> None:
        """Add ``other`` (whose model ``j`` is this one's ``models[j]``; all, in order, if None)."""
        index = list(range(self.k)) if models is None else models
        self.numel += other.numel
        self.tensors += other.tensors
        self.base_sq += other.base_sq
        self.interference_sq += other.interference_sq
        self.reference_sq += other.reference_sq
        self.recipe = self.recipe or other.recipe
        for name in ("delta_sq", "weight_sq", "weight_dot_base", "retained_sq"):
            getattr(self, name)[index] += getattr(other, name)
        self.top_sq[index] += other.top_sq
        pairs = np.ix_(index, index)
        self.pair_dot[pairs] += other.pair_dot
        self.pair_top[pairs] += other.pair_top
        self.pair_conflict[pairs] += other.pair_conflict

    # ------------------------------------------------------------------ figures

    def delta_norm(self) -> np.ndarray:
        """``‖δ_i‖`` per model."""
        return np.sqrt(self.delta_sq)

    def relative_norm(self) -> np.ndarray:
        """``‖δ_i‖ / ‖base‖`` per model (inf for a zero base)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(self.delta_sq) / math.sqrt(self.base_sq)

    def base_cosine(self) -> np.ndarray:
        """``cos(x_i, base)`` per model (NaN where a norm is zero)."""
        return _ratio(self.weight_dot_base, np.sqrt(self.weight_sq * self.base_sq))

    def cosine(self) -> np.ndarray:
        """``(k, k)`` pairwise cosines of the task vectors (NaN where one is zero)."""
        norms = np.sqrt(np.diag(self.pair_dot))
        return _ratio(self.pair_dot, np.outer(norms, norms))

    def conflict(self) -> np.ndarray:
        """``(k, k)`` sign-conflict rates among both models' top 20% (NaN where none overlap)."""
        return _ratio(self.pair_conflict, self.pair_top)

    def top_share(self) -> np.ndarray:
        """``(k, len(TOP_SHARES))`` share of each task vector's squared norm in its top p%."""
        return _ratio(self.top_sq, self.delta_sq[:, None])

    def retained(self) -> np.ndarray:
        """Share of each task vector's squared norm that survives sparsify and elect."""
        return _ratio(self.retained_sq, self.delta_sq)

    def interference(self) -> float:
        """``‖merged delta − Σ c_i δ_i‖ / ‖Σ c_i δ_i‖`` (NaN when the reference is zero)."""
        if self.reference_sq == 0:
            return math.nan
        return math.sqrt(self.interference_sq / self.reference_sq)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan
        )


def shares_base(relative_norm: float, base_cosine: float) -> bool:
    """Whether a model's whole-model figures say it was fine-tuned from the base.

    The figures are those of the weight matrices (tensors of two or more dimensions): norm
    gains sit near 1 while matrix entries are near 0.02, so in a small model a few norm
    vectors would outweigh every matrix and hide a foreign model.
    """
    return relative_norm <= NOT_SHARED_RELATIVE and not base_cosine < NOT_SHARED_COSINE


def tensor_sums(base: torch.Tensor, tensors: torch.Tensor) -> Sums:
    """The sums of one tensor: ``base`` and ``tensors`` ``(k, *shape)``, computed in float64.

    Neither argument is modified. Memory: one float64 copy of the k tensors (which becomes
    their task vectors) and what :func:`task_vector_sums` needs.
    """
    k = tensors.shape[0]
    base64 = base.reshape(-1).to(torch.float64)
    deltas = tensors.reshape(k, -1).to(torch.float64, copy=True)  # (k, n): one row per model
    deltas -= base64  # now the task vectors
    return task_vector_sums(base64, deltas)


def task_vector_sums(base64: torch.Tensor, deltas: torch.Tensor) -> Sums:
    """The sums of one tensor from its float64 base ``(n,)`` and task vectors ``(k, n)``.

    Neither is modified. Memory: three boolean masks per model and a few float64 rows; top
    sets come from one ``torch.topk`` per model (O(n log k)), not a sort. The weights' own
    sums follow from the task vectors: ``‖x‖² = ‖δ‖² + 2δ·b + ‖b‖²``, ``x·b = δ·b + ‖b‖²``.
    """
    k, n = deltas.shape
    sums = Sums(k, numel=n, tensors=1, base_sq=float(base64 @ base64))
    sums.pair_dot = (deltas @ deltas.T).numpy()
    sums.delta_sq = np.diag(sums.pair_dot).copy()
    delta_dot_base = (deltas @ base64).numpy()
    sums.weight_sq = sums.delta_sq + 2 * delta_dot_base + sums.base_sq
    sums.weight_dot_base = delta_dot_base + sums.base_sq
    top = torch.zeros((k, n), dtype=torch.bool)  # each model's top 20% by magnitude
    largest = top_count(max(TOP_SHARES), n)
    for i in range(k):
        # one top-k, sorted: the smaller shares are its prefixes (ties hold equal squares, so
        # which of them is taken does not change a sum)
        values, indices = torch.topk(deltas[i].abs(), largest, sorted=True)
        mass = torch.cumsum(values * values, dim=0)  # (largest,): mass of the top 1, 2, ...
        for column, share in enumerate(TOP_SHARES):
            sums.top_sq[i, column] = float(mass[top_count(share, n) - 1])
        count = top_count(CONFLICT_TOP, n)
        top[i, indices[:count][values[:count] > 0]] = True  # zeros are not "changed most"
        del values, indices, mass
    positive, negative = deltas > 0, deltas < 0  # a zero entry has no sign and never conflicts
    for i in range(k):
        for j in range(i, k):
            both = top[i] & top[j]
            opposite = (positive[i] & negative[j]) | (negative[i] & positive[j])
            sums.pair_top[i, j] = sums.pair_top[j, i] = int(both.sum())
            conflicts = int((both & opposite).sum())
            sums.pair_conflict[i, j] = sums.pair_conflict[j, i] = conflicts
    return sums


def retained_sums(deltas: torch.Tensor, survived: torch.Tensor | None) -> np.ndarray:
    """Per model, the squared norm of the task-vector entries that survive (``(k, *shape)``
    float64 and bool); NaN when the method has no sparsify/elect steps (``survived`` None)."""
    k = deltas.shape[0]
    if survived is None:
        return np.full(k, np.nan)
    flat = deltas.reshape(k, -1)
    kept = torch.where(survived.reshape(k, -1).to(flat.device), flat, 0.0)
    return (kept * kept).sum(dim=1).cpu().numpy()
