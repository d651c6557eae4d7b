"""Spectral (SVD) merges of task matrices: TSV-M, Iso-C and Iso-CTS.

Each 2-D tensor's task vectors ``τ_i = x_i − base`` are treated as matrices and merged through
their singular value decompositions; every other tensor (norms, biases: 1-D) gets the mean of
its task vectors, as the papers do. Embedding and LM-head matrices are 2-D and take the SVD
path too, as in FusionBench (whose ``exclude_keys`` is empty by default); ``keep_from_base:
[embedding, head]`` takes them from the base instead.

* **tsv**: Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
  Merging", CVPR 2025, arXiv:2412.00081.
* **iso_c**, **iso_cts**: Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging
  with Common and Task-Specific Subspaces", ICML 2025, arXiv:2502.04959.

Well-definedness. Singular vectors of zero (or rounding-level) singular values are arbitrary:
LAPACK returns some basis of the null space. The papers' formulas use them (a flat spectrum
gives them weight; orthogonalising concatenated bases mixes them in) whenever a matrix is rank
deficient, so their output would depend on the LAPACK build. Here every SVD keeps only the
directions whose singular value exceeds ``max(m, n)·eps·scale`` (NumPy's ``matrix_rank``
rule), and orthogonalisation uses the polar factor on the range (``P Qᵀ`` over the nonzero
singular values). For the generic, full-rank case (every real fine-tune) this is exactly the
papers' formula; in the degenerate cases it is its unique, basis-free version.

Memory per 2-D tensor: the inputs plus a fixed number of matrices of the tensor's size (the
running sum, one task matrix, the concatenated bases and one LAPACK SVD, which itself holds a
copy of its input, U, Vᵀ and a workspace), whatever the number of models.
"""

from __future__ import annotations

import math

import torch

from alloykit.methods.registry import MethodInputs
from alloykit.methods.task_vectors import stable_sum


def _delta_sum(base: torch.Tensor, tensors: torch.Tensor) -> torch.Tensor:
    """``Σ_i (x_i − base)``, added in model order, holding one extra tensor."""
    total = tensors[0] - base
    for tensor in tensors[1:]:
        total.add_(tensor).sub_(base)
    return total


def _mean_task_vector(base: torch.Tensor, tensors: torch.Tensor, alpha: float) -> torch.Tensor:
    """``base + α·mean_i(x_i − base)``: the papers' rule for the tensors that are not 2-D."""
    return _delta_sum(base, tensors).mul_(alpha / tensors.shape[0]).add_(base)


def _rank(singular_values: torch.Tensor, shape: tuple[int, int], scale: float) -> int:
    """How many (descending) singular values exceed ``max(m, n)·eps·scale``."""
    if singular_values.numel() == 0:
        return 0
    tolerance = max(shape) * torch.finfo(singular_values.dtype).eps * scale
    return int((singular_values > tolerance).sum())


def _svd(matrix: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, ...]:
    """Thin SVD truncated to the numerically nonzero part: ``U_r, S_r, Vᵀ_r``.

    ``scale`` sets the tolerance (default: the largest singular value of ``matrix``).
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    largest = float(s[0]) if s.numel() else 0.0
    keep = _rank(s, (matrix.shape[0], matrix.shape[1]), largest if scale is None else scale)
    return u[:, :keep], s[:keep], vh[:keep]


def _orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """The polar factor of ``basis`` on its range: ``P Qᵀ`` from ``basis = P Σ Qᵀ``.

    The orthonormal matrix nearest to ``basis`` (orthogonal Procrustes), used by TSV-M and
    Iso-CTS to orthogonalise concatenated singular vectors; zero singular values are left out,
    so linearly dependent columns do not bring in an arbitrary null-space basis.
    """
    p, _, qh = _svd(basis)
    return p @ qh


def _flat_spectrum_mean(singular_values: torch.Tensor) -> float:
    """Mean of the singular values, summed in a fixed order (independent of threads)."""
    return stable_sum(singular_values) / singular_values.numel()


def _frobenius(matrix: torch.Tensor) -> float:
    return math.sqrt(stable_sum(matrix.double() ** 2))


def tsv_merge(base: torch.Tensor, tensors: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """TSV-M: concatenate each task's top ``⌊r/T⌋`` singular triplets, orthogonalise, rebuild.

    ``τ_i = U_i S_i V_iᵀ``; ``U = [U_1,k … U_T,k]``, ``S = diag(S_1,k … S_T,k)``,
    ``V = [V_1,k … V_T,k]`` with ``k = ⌊min(m, n)/T⌋``; ``out = base + α·⊥(U) S ⊥(V)ᵀ`` with
    ``⊥`` the polar factor (Gargiulo et al. 2025, CVPR, arXiv:2412.00081). Tensors that are
    not 2-D, and matrices with fewer rows or columns than models (``k = 0``), get
    ``base + α·mean_i τ_i``.

    Args:
        base: the base model's tensor.
        tensors: ``(T, *shape)``: the fine-tuned models' tensors.
        alpha: scales the merged task vector (default 1.0; the paper tunes it on validation).

    Returns:
        A new tensor of ``base``'s shape and dtype.

    Example:
        Two tasks that change orthogonal directions keep both, each with its singular value:

        >>> base = torch.zeros(2, 2)
        >>> tuned = torch.tensor([[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])
        >>> tsv_merge(base, tuned)
        tensor([[3., 0.],
                [0., 2.]])
    """
    tasks = tensors.shape[0]
    if base.dim() != 2 or min(base.shape) // tasks == 0:
        return _mean_task_vector(base, tensors, alpha)
    rows, cols = base.shape
    per_task = min(rows, cols) // tasks
    left = base.new_empty(rows, per_task * tasks)
    values = base.new_empty(per_task * tasks)
    right = base.new_empty(per_task * tasks, cols)
    filled = 0
    for tensor in tensors:
        u, s, vh = _svd(tensor - base)
        kept = min(per_task, s.numel())
        left[:, filled : filled + kept] = u[:, :kept]
        values[filled : filled + kept] = s[:kept]
        right[filled : filled + kept] = vh[:kept]
        filled += kept
        del u, s, vh  # free this task's SVD before the next one
    if filled == 0:  # every task vector is zero
        return base.clone()
    left_orthonormal = _orthonormal(left[:, :filled])
    del left
    right_orthonormal = _orthonormal(right[:filled])
    del right
    left_orthonormal.mul_(values[:filled] * alpha)
    return torch.addmm(base, left_orthonormal, right_orthonormal)


def iso_c(base: torch.Tensor, tensors: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Iso-C: the task-arithmetic sum with its singular values replaced by their mean.

    ``Σ_i τ_i = U S Vᵀ``; ``out = base + α·σ̄·U Vᵀ`` with ``σ̄`` the mean of the nonzero
    singular values (Marczak et al. 2025, ICML, arXiv:2502.04959). Tensors that are not 2-D
    get ``base + α·mean_i τ_i``.

    Args:
        base: the base model's tensor.
        tensors: ``(T, *shape)``: the fine-tuned models' tensors.
        alpha: scales the merged task vector (default 1.0, FusionBench's; the paper tunes it
            on validation data).

    Returns:
        A new tensor of ``base``'s shape and dtype.

    Example:
        The sum ``diag(4, 2)`` has singular values 4 and 2; their mean is 3:

        >>> tuned = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
        >>> iso_c(torch.zeros(2, 2), tuned)
        tensor([[3., 0.],
                [0., 3.]])
    """
    if base.dim() != 2:
        return _mean_task_vector(base, tensors, alpha)
    u, s, vh = _svd(_delta_sum(base, tensors))
    if s.numel() == 0:  # the task vectors sum to zero
        return base.clone()
    u = u * (_flat_spectrum_mean(s) * alpha)
    return torch.addmm(base, u, vh)


def iso_cts(
    base: torch.Tensor,
    tensors: torch.Tensor,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
) -> torch.Tensor:
    """Iso-CTS: a common subspace plus task-specific ones, orthogonalised, with a flat spectrum.

    With ``r = min(m, n)``: ``k = round((r − ⌊r·f⌋)/T)`` task-specific directions per task and
    ``k_c = r − T·k`` common ones (``f`` = ``common_space_fraction``). Common: the top ``k_c``
    singular triplets of ``Σ_i τ_i``. Task i: the top ``k`` of ``(I − U_c U_cᵀ) τ_i``.
    Concatenate all; ``out = base + α·σ̄·⊥(U) ⊥(V)ᵀ`` with ``⊥`` the polar factor and ``σ̄`` the
    mean of the selected singular values (Marczak et al. 2025, ICML, arXiv:2502.04959).
    Tensors that are not 2-D get ``base + α·mean_i τ_i``.

    Args:
        base: the base model's tensor.
        tensors: ``(T, *shape)``: the fine-tuned models' tensors.
        alpha: scales the merged task vector (default 1.0, FusionBench's).
        common_space_fraction: share of the ``r`` directions given to the common subspace
            (default 0.8, the paper's), before rounding the rest to a multiple of T.

    Returns:
        A new tensor of ``base``'s shape and dtype.

    Example:
        ``r = 3``, ``f = 0.34``: one common direction (e1, σ = 8 in the sum) and one per task
        (e2 with σ = 1, e3 with σ = 2); the flat spectrum is their mean, 11/3:

        >>> tuned = torch.stack([torch.diag(torch.tensor(d)) for d in ([4.0, 1, 0], [4.0, 0, 2])])
        >>> iso_cts(torch.zeros(3, 3), tuned, common_space_fraction=0.34)
        tensor([[3.6667, 0.0000, 0.0000],
                [0.0000, 3.6667, 0.0000],
                [0.0000, 0.0000, 3.6667]])
    """
    if base.dim() != 2:
        return _mean_task_vector(base, tensors, alpha)
    tasks = tensors.shape[0]
    rows, cols = base.shape
    rank = min(rows, cols)
    per_task, common = _subspace_sizes(rank, tasks, common_space_fraction)
    left = base.new_empty(rows, common + per_task * tasks)
    values = base.new_empty(common + per_task * tasks)
    right = base.new_empty(common + per_task * tasks, cols)

    total = _delta_sum(base, tensors)
    # one tolerance for every SVD below: rounding noise left after projecting out the common
    # space must not count as a direction (it would get the full flat singular value)
    scale = max(_frobenius(total), max(_frobenius(t - base) for t in tensors))
    u, s, vh = _svd(total, scale)
    del total
    filled = min(common, s.numel())
    left[:, :filled] = u[:, :filled]
    values[:filled] = s[:filled]
    right[:filled] = vh[:filled]
    del u, s, vh
    common_left = left[:, :filled]
    for tensor in tensors:
        residual = tensor - base
        residual -= common_left @ (common_left.T @ residual)  # project out the common space
        u, s, vh = _svd(residual, scale)
        del residual
        kept = min(per_task, s.numel())
        left[:, filled : filled + kept] = u[:, :kept]
        values[filled : filled + kept] = s[:kept]
        right[filled : filled + kept] = vh[:kept]
        filled += kept
        del u, s, vh
    if filled == 0:  # every task vector is zero
        return base.clone()
    flat = _flat_spectrum_mean(values[:filled]) * alpha
    left_orthonormal = _orthonormal(left[:, :filled])
    del left, common_left
    right_orthonormal = _orthonormal(right[:filled])
    del right
    return torch.addmm(base, left_orthonormal, right_orthonormal, alpha=flat)


def _subspace_sizes(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(directions per task, common directions) for Iso-CTS, summing to at most ``rank``.

    The common space starts at ``int(rank·f)``; the rest is rounded (Python's ``round``, as in
    the authors' code) to a multiple of the task count, and never beyond ``rank``.
    """
    common = int(rank * common_space_fraction)
    per_task = round((rank - common) / tasks)
    if per_task * tasks > rank:
        per_task = rank // tasks
    return per_task, rank - per_task * tasks


def _run(inputs: MethodInputs) -> tuple[torch.Tensor, torch.Tensor, float]:
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return inputs.base, inputs.tensors, float(inputs.params["alpha"])


def run_tsv(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`tsv_merge` with the global ``alpha``."""
    return tsv_merge(*_run(inputs))


def run_iso_c(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`iso_c` with the global ``alpha``."""
    return iso_c(*_run(inputs))


def run_iso_cts(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`iso_cts` with ``alpha`` and ``common_space_fraction``."""
    base, tensors, alpha = _run(inputs)
    return iso_cts(base, tensors, alpha, float(inputs.params["common_space_fraction"]))
