"""Interpolation on the sphere: slerp, NuSLERP, Multi-SLERP and the Karcher mean of weights.

Each method treats a tensor (or each row of it) as a vector, interpolates or averages the
directions on the unit sphere and rescales by the inputs' norms, so a blend of models does not
shrink the weights the way a straight average does. Every sum that decides a result (a norm, a
dot product) is taken in float64 in an order fixed by the shape alone, so outputs do not depend
on the number of threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from alloykit.errors import MergeError
from alloykit.methods.reductions import PARTIAL_SUM, stable_row_sums
from alloykit.methods.registry import MethodInputs
from alloykit.methods.task_vectors import (
    ZERO_WEIGHT_SUM,
    blocks,
    fused_block_sum,
    fused_loops,
    stable_block_sum,
    stable_square_sum,
    stable_sum,
)

# MergeKit's threshold: inputs closer to colinear than this are lerped (reference §1.5).
COLINEAR = 0.9995
_NORM_EPSILON = 1e-8
# NuSLERP (reference §1.6): norms are clamped to at least this before normalising, and rows
# whose |sin θ| is below NUSLERP_COLINEAR are lerped.
NUSLERP_NORM_FLOOR = 1e-7
NUSLERP_COLINEAR = 1e-8
# MergeKit's nuslerp treats a weight sum below this as zero and then takes t = 1/2.
NUSLERP_ZERO_WEIGHT_SUM = 1e-6
# Karcher steps skip inputs within this angle (radians) of the point opposite the current mean:
# their direction from it is undefined, and acos near −1 is only good to about 1e-8.
KARCHER_OPPOSITE = 1e-6
# A coefficient sum this close to one is one: float64 rounding of the coefficients (a few ulps)
_ROUNDING = 1e-14


def _norm(tensor: torch.Tensor) -> float:
    """The Euclidean norm of a whole tensor, summed in float64 in a fixed order (block by
    block: no float64 copy of the tensor)."""
    return math.sqrt(stable_square_sum(tensor.reshape(-1)))


def _dot(first: torch.Tensor, second: torch.Tensor) -> float:
    """The dot product of two whole tensors, summed in float64 in a fixed order."""
    return stable_sum(first.double() * second.double())


def _unit_dot(v0: torch.Tensor, norm0: float, v1: torch.Tensor, norm1: float) -> float:
    """``_dot(v0 / norm0, v1 / norm1)`` bit for bit (a norm at or below epsilon divides by
    nothing), block by block: no unit vectors or float64 copies are materialised."""
    flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
    loops = fused_loops(flat0, flat1) if v0.dtype == v1.dtype else None
    if loops is not None and flat0.numel() > PARTIAL_SUM:  # the same products in one pass
        scalar = flat0.numpy().dtype.type  # torch divides by the norm rounded to the dtype
        divisors = (
            scalar(norm0 if norm0 > _NORM_EPSILON else 1.0),
            scalar(norm1 if norm1 > _NORM_EPSILON else 1.0),
        )
        return fused_block_sum(
            flat0.numel(),
            lambda block, out: loops.unit_products_(
                flat0[block].numpy(), flat1[block].numpy(), *divisors, out.numpy()
            ),
        )

    def unit(flat: torch.Tensor, norm: float, block: slice) -> torch.Tensor:
        part = flat[block]
        return (part / norm if norm > _NORM_EPSILON else part).double()

    return stable_block_sum(
        flat0.numel(), lambda block: unit(flat0, norm0, block) * unit(flat1, norm1, block)
    )


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation of two whole tensors (Shoemake 1985; MergeKit's ``slerp``).

    Both tensors are one flattened vector each: ``cos θ = <v0/‖v0‖, v1/‖v1‖>``; when
    ``|cos θ| > 0.9995`` the result is the plain lerp ``v0 + t·(v1 − v0)``, else
    ``sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1``. ``t = 0`` gives ``v0`` (the base).
    The dot product is a float64 sum in a fixed order, so the result does not depend on threads.

    Args:
        v0: the base model's tensor (t = 0).
        v1: the other model's tensor (t = 1).
        t: interpolation factor.

    Returns:
        The interpolated tensor.

    Example:
        >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        tensor([0.7071, 0.7071])
    """
    norm0 = _norm(v0)
    norm1 = _norm(v1)
    dot = _unit_dot(v0, norm0, v1, norm1)
    out = torch.empty(v0.shape, dtype=v0.dtype, device=v0.device)
    flat0, flat1, flat = v0.reshape(-1), v1.reshape(-1), out.view(-1)
    loops = fused_loops(flat0, flat1, flat) if v0.dtype == v1.dtype else None
    # torch rounds a Python factor to the tensors' dtype: the fused loops get it rounded alike
    scalar = flat.numpy().dtype.type if loops is not None else float
    if abs(dot) > COLINEAR:  # 1) nearly colinear: the sphere is flat here
        if loops is not None:  # the same ops in one pass (tests/methods/test_loops.py)
            loops.pair_combine(
                flat0.numpy(), flat1.numpy(), scalar(t), scalar(0), True, flat.numpy()
            )
            return out
        for block in blocks(flat.numel()):
            flat[block] = flat0[block] + t * (flat1[block] - flat0[block])
        return out
    theta = math.acos(dot)  # 2) the angle between the two directions
    sin_theta = math.sin(theta)
    a, b = math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
    if loops is not None:
        loops.pair_combine(flat0.numpy(), flat1.numpy(), scalar(a), scalar(b), False, flat.numpy())
        return out
    for block in blocks(flat.numel()):  # elementwise: block by block, bounded temporaries
        flat[block] = a * flat0[block] + b * flat1[block]
    return out


def run_slerp(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`slerp` from the base (t = 0) to the one other model."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    return slerp(inputs.base, inputs.tensors[0], float(inputs.params["t"]))


def _around_first(
    tensors: Sequence[torch.Tensor] | torch.Tensor,
    coefficients: Sequence[float | torch.Tensor],
    origin: torch.Tensor | None = None,
) -> torch.Tensor:
    """``origin + Σ_i a_i·(x_i − origin)`` for float64 coefficients ``a_i`` (numbers or tensors
    that broadcast against ``x_i``), in the working dtype of ``x``.

    Taken around the first input, ``x_0 + (Σa − 1)·(x_0 − origin) + Σ_{i≥1} a_i·(x_i − x_0)``:
    the same number in exact arithmetic, and ``x_0`` itself when every input is ``x_0`` and the
    coefficients sum to one, so merging identical models gives the model back. The loop runs
    in a fixed order, so the result does not depend on threads.
    """
    first = tensors[0]
    excess = sum(coefficients, start=-1.0)  # in float64: a small excess must not round away
    # ...but one of a few float64 ulps is the rounding of the coefficients themselves (they sum
    # to one exactly for identical inputs); dropping it keeps x_0 bit for bit in float64 too
    if isinstance(excess, torch.Tensor):
        excess = torch.where(excess.abs() < _ROUNDING, 0.0, excess)
    elif abs(excess) < _ROUNDING:
        excess = 0.0
    out = first.clone()
    if not isinstance(excess, float) or excess != 0.0:
        offset = first if origin is None else first - origin
        out.add_(offset * _working(excess, first))
    for i in range(1, len(tensors)):
        coefficient = _working(coefficients[i], first)
        if isinstance(coefficient, torch.Tensor):
            out.addcmul_(tensors[i] - first, coefficient)
        elif coefficient != 0.0:
            out.add_(tensors[i] - first, alpha=coefficient)
    return out


def _working(coefficient: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A coefficient in ``like``'s dtype and device; numbers stay numbers (they do not promote)."""
    if isinstance(coefficient, torch.Tensor):
        return coefficient.to(dtype=like.dtype, device=like.device)
    return coefficient


def nuslerp_t(first_weight: float, second_weight: float) -> float:
    """NuSLERP's interpolation factor from the two models' weights (MergeKit's ``nuslerp``).

    ``t = w_2 / (w_1 + w_2)``; ``1/2`` when ``|w_1 + w_2| < 1e-6``, where the ratio means nothing.

    Example:
        >>> nuslerp_t(0.75, 0.25)
        0.25
    """
    total = first_weight + second_weight
    return 0.5 if abs(total) < NUSLERP_ZERO_WEIGHT_SUM else second_weight / total


def _vectors(tensor: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """A view of ``tensor`` with NuSLERP's vectors along the last dimension."""
    if flatten or tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    # MergeKit's row_wise swaps the first and last dimensions: the vectors run along dim 0
    return tensor.transpose(0, -1) if row_wise else tensor


def _per_vector(
    values: torch.Tensor, shape: torch.Size, *, flatten: bool, row_wise: bool
) -> torch.Tensor:
    """One value per vector of :func:`_vectors`, shaped to broadcast against ``shape``."""
    if flatten or len(shape) <= 1:
        return values.reshape(())
    values = values.unsqueeze(-1)
    return values.transpose(0, -1) if row_wise else values


def _unit_rows(
    tensor: torch.Tensor, *, flatten: bool, row_wise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """NuSLERP's vectors of ``tensor`` as float64 rows divided by their norms clamped at 1e-7,
    and the norms. The rows are a new contiguous copy, divided in place to save memory."""
    rows = _vectors(tensor, flatten=flatten, row_wise=row_wise).to(
        torch.float64, memory_format=torch.contiguous_format, copy=True
    )
    norms = stable_row_sums(rows * rows).sqrt()
    rows.div_(norms.clamp(min=NUSLERP_NORM_FLOOR).unsqueeze(-1))
    return rows, norms


def nuslerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    base: torch.Tensor | None = None,
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """NuSLERP: slerp of two models, or of their task vectors around a base (MergeKit's ``nuslerp``).

    With ``x_i = v_i − base`` (or ``v_i`` without a base), per vector:
    ``θ = acos(<x_0/‖x_0‖, x_1/‖x_1‖>)``, ``out = base + (sin((1−t)θ)·x_0 + sin(tθ)·x_1)/sin θ``
    (Shoemake 1985; Goddard et al. 2024, "Arcee's MergeKit", arXiv:2403.13257). Norms are
    clamped to at least 1e-7, so a zero vector has ``θ = π/2``; vectors with ``|sin θ| < 1e-8``
    (colinear) are lerped. ``flatten`` (default) makes the whole tensor one vector; otherwise
    each row (last dimension) is one, or each column (dimension 0) with ``row_wise``, which is
    MergeKit's meaning of that flag. Norms and dot products are float64 sums in a fixed order.

    Args:
        v0: the first model's tensor (t = 0).
        v1: the second model's tensor (t = 1).
        t: interpolation factor, usually :func:`nuslerp_t` of the models' weights.
        base: the base model's tensor, or None to interpolate the weights themselves.
        flatten: treat the whole tensor as one vector.
        row_wise: without ``flatten``, interpolate columns (dim 0) instead of rows.

    Returns:
        The interpolated tensor, same shape and dtype as ``v0``.

    Example:
        >>> nuslerp(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), 0.5)
        tensor([1.4142, 1.4142])
    """
    shape = v0.shape
    x0, x1 = (v0, v1) if base is None else (v0 - base, v1 - base)
    unit0, norm0 = _unit_rows(x0, flatten=flatten, row_wise=row_wise)
    unit1, norm1 = _unit_rows(x1, flatten=flatten, row_wise=row_wise)
    # θ = 2·atan2(‖û_0 − û_1‖, ‖û_0 + û_1‖) is acos(<û_0, û_1>) for unit vectors, but exact at
    # both ends: x_1 = x_0 gives θ = 0 and x_1 = −x_0 (or any two opposite one-element rows)
    # θ = π, so both are lerped, where acos of a rounded dot product lands a few 1e-8 away
    # and its slerp coefficients blow up. Rows with a norm under the floor are not unit
    # vectors; for them θ = acos(<û_0, û_1>) as in MergeKit, with 4<a, b> = ‖a + b‖² − ‖a − b‖².
    apart = stable_row_sums(torch.sub(unit0, unit1).square_())
    together = stable_row_sums(torch.add(unit0, unit1).square_())
    is_unit = (norm0 >= NUSLERP_NORM_FLOOR) & (norm1 >= NUSLERP_NORM_FLOOR)
    theta = torch.where(
        is_unit,
        2.0 * torch.atan2(apart.sqrt(), together.sqrt()),
        torch.acos(((together - apart) / 4.0).clamp(-1.0, 1.0)),
    )
    sin_theta = torch.sin(theta)
    colinear = sin_theta.abs() < NUSLERP_COLINEAR
    divisor = torch.where(colinear, torch.ones_like(sin_theta), sin_theta)
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / divisor)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / divisor)
    coefficients = [_per_vector(c, shape, flatten=flatten, row_wise=row_wise) for c in (c0, c1)]
    return _around_first((v0, v1), coefficients, base)


def run_nuslerp(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`nuslerp` of the two models, ``t`` from their weights."""
    first_weight, second_weight = (float(w) for w in inputs.per_model["weight"])
    return nuslerp(
        inputs.tensors[0],
        inputs.tensors[1],
        nuslerp_t(first_weight, second_weight),
        base=inputs.base,
        flatten=bool(inputs.params["nuslerp_flatten"]),
        row_wise=bool(inputs.params["nuslerp_row_wise"]),
    )


def multislerp(
    tensors: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    base: torch.Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multi-SLERP: the weighted mean direction of k models times their weighted mean norm.

    With ``x_i = v_i − base`` (or ``v_i``), ``n_i = ‖x_i‖``, ``u_i = x_i/(n_i + eps)`` and
    weights divided by their sum when ``normalize_weights``:
    ``out = base + m/‖m‖ · Σ_i w_i·n_i`` with ``m = Σ_i w_i·u_i`` (MergeKit's ``multislerp``,
    Goddard 2025, goddard.blog "multislerp"; a one-step form of the spherical weighted average
    of Buss & Fillmore 2001). MergeKit also maps the tangent vectors ``u_i − <u_i, m̂>m̂`` at
    ``m̂`` and back, but their weighted sum is ``m − <m, m̂>m̂ = 0``, so that step changes nothing
    and is left out. Each tensor is one flattened vector. When ``‖m‖ < eps`` the directions
    cancel: two inputs fall back to ``base + Σ w_i·x_i`` as in MergeKit, and so do inputs that
    are all zero (MergeKit raises there; alloykit returns the base); otherwise MergeError.

    Args:
        tensors: ``(k, *shape)``: one row per model besides the base.
        weights: ``(k,)`` per-model weights.
        base: the base model's tensor, or None to average the weights themselves.
        normalize_weights: divide the weights by their sum (the caller rejects a zero sum).
        eps: added to each norm before dividing, and the smallest ``‖m‖`` that has a direction.

    Returns:
        The merged tensor, ``shape``, same dtype as ``tensors``.

    Raises:
        MergeError: more than two inputs whose weighted directions cancel.

    Example:
        >>> multislerp(torch.tensor([[2.0, 0.0], [0.0, 4.0]]), [1.0, 1.0])
        tensor([2.1213, 2.1213])
    """
    count = tensors.shape[0]
    if count == 1:
        return tensors[0].clone()
    weight_list = [float(w) for w in weights]
    if normalize_weights:
        total = sum(weight_list)
        weight_list = [w / total for w in weight_list]
    # m in float64, so inputs that cancel give exactly zero and ‖m‖ is exact enough to test
    mean = torch.zeros(tensors.shape[1:], dtype=torch.float64, device=tensors.device)
    norms = []
    for weight, row in zip(weight_list, tensors, strict=True):
        delta = row if base is None else row - base
        norms.append(_norm(delta))
        mean.add_(delta.double(), alpha=weight / (norms[-1] + eps))
    mean_norm = math.sqrt(stable_sum(mean * mean))
    if mean_norm < eps:
        if count == 2 or not any(norms):
            return _around_first(tensors, weight_list, base)
        raise MergeError(
            f"multislerp: the weighted directions of the {count} inputs cancel (their weighted "
            f"mean has norm {mean_norm:.3g}, below eps {eps:g}), so they have no spherical "
            "mean; change the weights or leave out one of the opposed models"
        )
    # out = Σ_i a_i·x_i with a_i = (Σ_j w_j·n_j)·w_i / ((n_i + eps)·‖m‖)
    scale = sum(w * n for w, n in zip(weight_list, norms, strict=True)) / mean_norm
    coefficients = [scale * w / (n + eps) for w, n in zip(weight_list, norms, strict=True)]
    return _around_first(tensors, coefficients, base)


def run_multislerp(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`multislerp` of the models (task vectors when there is a base)."""
    return multislerp(
        inputs.tensors,
        inputs.per_model["weight"],
        inputs.base,
        normalize_weights=bool(inputs.params["normalize_weights"]),
        eps=float(inputs.params["eps"]),
    )


def multislerp_weights_must_not_cancel(
    per_model: Mapping[str, tuple[float, ...]], params: Mapping[str, Any]
) -> str | None:
    """multislerp divides by the sum of weights: a zero sum has no meaning (MergeKit gives NaN)."""
    total = sum(per_model.get("weight", ()))
    if (
        params.get("normalize_weights")
        and len(per_model.get("weight", ())) > 1
        and abs(total) < ZERO_WEIGHT_SUM
    ):
        return (
            f"the weights sum to {total:g}, and normalize_weights: true would divide by it; "
            "change a weight or set normalize_weights: false"
        )
    return None


def karcher(tensors: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the inputs' directions times their mean norm.

    Equal weights ``α = 1/k``; ``û_i = x_i/‖x_i‖`` over the inputs with ``‖x_i‖ > tol``. The
    mean direction ``u`` minimises ``Σ_i θ(u, û_i)²`` on the unit sphere (Karcher 1977,
    "Riemannian center of mass and mollifier smoothing"; MergeKit's ``karcher``, whose docs cite
    arXiv:2603.04972): start from ``normalize(Σ û_i)`` and repeat at most ``max_iter`` times
    ``T = Σ_i α_i·θ_i/sin θ_i·(û_i − cos θ_i·u)``, stopping when ``‖T‖ < tol``, else
    ``u ← cos‖T‖·u + sin‖T‖·T/‖T‖``. ``out = (Σ_i ‖x_i‖/k)·u``. Inputs closer than ``tol``
    in angle to ``u`` are skipped as in MergeKit, and so are inputs opposite to ``u`` (within
    1e-6 of π), whose direction from ``u`` is undefined. Each tensor is one flattened vector.

    ``u`` stays in the span of the inputs, so it is kept as coefficients over them and every
    step works on their float64 Gram matrix: one pass over the tensors for ``k(k+1)/2`` dot
    products, not one per iteration. Embeddings and the head need nothing special: alloykit's
    planner already requires every input's tensor to have the same shape (MergeKit's crop of
    differently sized vocabularies never reaches this method), and the vocabulary rows are
    then merged like any other vector.

    Args:
        tensors: ``(k, *shape)``: one row per input (a configured base is one of them).
        max_iter: the most gradient steps.
        tol: the step size that counts as converged, and the smallest norm and angle used.

    Returns:
        The merged tensor, ``shape``, same dtype as ``tensors``.

    Example:
        >>> karcher(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        tensor([1.4142, 1.4142])
    """
    count = tensors.shape[0]
    if count == 1:
        return tensors[0].clone()
    gram = torch.zeros((count, count), dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            gram[i, j] = gram[j, i] = _dot(tensors[i], tensors[j])
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(tensors[0])
    # equal weights over the inputs that have a direction
    alphas = valid.double() / int(valid.sum())
    inverse_norms = torch.where(valid, 1.0 / torch.where(valid, norms, 1.0), 0.0)

    def length(coefficients: torch.Tensor) -> float:
        """‖Σ_i c_i·x_i‖ from the Gram matrix."""
        return math.sqrt(max(float(coefficients @ gram @ coefficients), 0.0))

    # u = Σ_i γ_i·x_i; start at the normalised Euclidean mean of the unit vectors
    gamma = alphas * inverse_norms
    start = length(gamma)
    if start < tol:  # the unit vectors cancel: start at the first that has a direction
        gamma = torch.zeros_like(gamma)
        first = int(torch.nonzero(valid)[0])
        gamma[first] = inverse_norms[first]
    else:
        gamma = gamma / start
    for _ in range(max_iter):
        cos_theta = ((gram @ gamma) * inverse_norms).clamp(-1.0, 1.0)
        theta = torch.acos(cos_theta)
        used = valid & (theta > 0.0) & (theta >= tol) & (math.pi - theta >= KARCHER_OPPOSITE)
        factors = torch.where(used, alphas * theta / torch.sin(theta), 0.0)
        # T = Σ_i f_i·(x_i/n_i − cos θ_i·u), as coefficients over the inputs
        tangent = factors * inverse_norms - float((factors * cos_theta).sum()) * gamma
        step = length(tangent)
        if step < tol:
            break
        gamma = math.cos(step) * gamma + (math.sin(step) / step) * tangent
        size = length(gamma)
        if size > tol:
            gamma = gamma / size
    scale = float(norms.sum()) / count  # every input's norm, with MergeKit's original 1/k
    return _around_first(tensors, [scale * float(g) for g in gamma])


def run_karcher(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`karcher` of every input (the base, if any, is one of them)."""
    return karcher(
        inputs.tensors, max_iter=int(inputs.params["max_iter"]), tol=float(inputs.params["tol"])
    )
