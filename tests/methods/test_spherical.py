"""The spherical methods (slerp, nuslerp, multislerp, karcher): reference tests against NumPy
float64 readings of their formulas, hand-worked cases and properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit import merge_to_state_dict
from alloykit.errors import AlloyError, ConfigError, MergeError
from alloykit.methods.spherical import karcher, multislerp, nuslerp, nuslerp_t, slerp
from tests.helpers import load_tensors


def reference(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    """Shoemake 1985 on flattened tensors, with MergeKit's lerp for |cos θ| > 0.9995."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.dot(a / na if na > 1e-8 else a, b / nb if nb > 1e-8 else b))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


@pytest.mark.parametrize("shape", [(1,), (5,), (7, 3), (2, 3, 4)])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_matches_float64_reference(shape: tuple[int, ...], t: float) -> None:
    rng = np.random.default_rng(len(shape) * 10 + int(t * 4))
    v0, v1 = rng.standard_normal(shape), rng.standard_normal(shape)
    ours = slerp(torch.from_numpy(v0), torch.from_numpy(v1), t).numpy()
    np.testing.assert_allclose(ours, reference(v0, v1, t), rtol=1e-10, atol=1e-12)


def test_quarter_circle_by_hand() -> None:
    # 90 degrees apart, t = 1/3: the result is 30 degrees from v0
    out = slerp(
        torch.tensor([2.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 2.0], dtype=torch.float64),
        1 / 3,
    )
    torch.testing.assert_close(
        out, torch.tensor([2 * np.cos(np.pi / 6), 2 * np.sin(np.pi / 6)], dtype=torch.float64)
    )


def test_nearly_colinear_inputs_are_lerped() -> None:
    v0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([2.0, 0.01, 0.0], dtype=torch.float64)  # cos θ ≈ 0.99999
    torch.testing.assert_close(slerp(v0, v1, 0.3), 0.7 * v0 + 0.3 * v1)


@settings(max_examples=50, deadline=None)
@given(t=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_identical_inputs_are_returned_bit_for_bit(t: float, seed: int) -> None:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((6, 5)).astype(np.float32))
    assert torch.equal(slerp(x, x.clone(), t), x)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_endpoints_are_the_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v0, v1 = (torch.from_numpy(rng.standard_normal(9)) for _ in range(2))
    torch.testing.assert_close(slerp(v0, v1, 0.0), v0)
    torch.testing.assert_close(slerp(v0, v1, 1.0), v1)


# ---------------------------------------------------------------------------------------------
# NuSLERP, Multi-SLERP and the Karcher mean. Each reference below is a plain NumPy float64
# reading of the formulas in MergeKit's semantics (reference §1.6-1.8), step by step as written
# there: unit vectors first, then dot products, loops over models and rows.
# ---------------------------------------------------------------------------------------------

SHAPES = [(1,), (5,), (7, 3), (3, 1), (2, 3, 4), (1, 9)]


def nuslerp_pair_reference(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """§1.6 for one pair of vectors: unit vectors with the norm clamped at 1e-7, cos clamped."""
    unit_a = a / max(np.linalg.norm(a), 1e-7)
    unit_b = b / max(np.linalg.norm(b), 1e-7)
    theta = np.arccos(np.clip(np.sum(unit_a * unit_b), -1.0, 1.0))
    if abs(np.sin(theta)) < 1e-8:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def nuslerp_reference(
    x1: np.ndarray,
    x2: np.ndarray,
    w1: float,
    w2: float,
    base: np.ndarray | None = None,
    flatten: bool = True,
    row_wise: bool = False,
) -> np.ndarray:
    """§1.6: t = w2/(w1+w2) (1/2 for a zero sum); task vectors around a base; per vector."""
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    v0, v1 = (x1, x2) if base is None else (x1 - base, x2 - base)
    if flatten or v0.ndim <= 1:
        out = nuslerp_pair_reference(v0.ravel(), v1.ravel(), t).reshape(v0.shape)
    else:
        # row_wise: the vectors run along dim 0; else along the last dim
        a = np.moveaxis(v0, 0, -1) if row_wise else v0
        b = np.moveaxis(v1, 0, -1) if row_wise else v1
        rows = np.empty_like(a)
        for index in np.ndindex(*a.shape[:-1]):
            rows[index] = nuslerp_pair_reference(a[index], b[index], t)
        out = np.moveaxis(rows, -1, 0) if row_wise else rows
    return out if base is None else base + out


def multislerp_reference(
    xs: list[np.ndarray],
    weights: list[float],
    base: np.ndarray | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> np.ndarray:
    """§1.7 with MergeKit's tangent-space step kept (alloykit leaves it out as a no-op)."""
    if len(xs) == 1:
        return xs[0]
    vectors = [(x if base is None else x - base).ravel() for x in xs]
    w = np.array(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = [np.linalg.norm(v) for v in vectors]
    units = [v / (n + eps) for v, n in zip(vectors, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    origin = 0.0 if base is None else base
    if np.linalg.norm(mean) < eps:
        if len(xs) == 2:
            return (w[0] * vectors[0] + w[1] * vectors[1]).reshape(xs[0].shape) + origin
        raise ValueError("antipodal")
    direction = mean / np.linalg.norm(mean)
    tangents = [u - np.dot(u, direction) * direction for u in units]
    tangent = sum(wi * tau for wi, tau in zip(w, tangents, strict=True))
    size = np.linalg.norm(tangent) + eps
    result = direction * np.cos(size) + tangent * np.sin(size) / size
    scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
    return (result * scale).reshape(xs[0].shape) + origin


def karcher_reference(xs: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """§1.8: equal weights, zero norms excluded, gradient steps on the unit sphere."""
    if len(xs) == 1:
        return xs[0]
    alpha = 1.0 / len(xs)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x.ravel() / n if n > 0 else np.zeros(x.size) for x, n in zip(xs, norms, strict=True)]
    kept = [u for u, n in zip(units, norms, strict=True) if n > tol]
    if not kept:
        return np.zeros_like(xs[0])
    beta = 1.0 / len(kept)
    mean = sum(beta * u for u in kept)
    u = kept[0].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(u)
        for unit in kept:
            cos = np.clip(np.dot(u, unit), -1.0, 1.0)
            theta = np.arccos(cos)
            if theta < tol:
                continue
            tangent += beta * theta / np.sin(theta) * (unit - cos * u)
        size = np.linalg.norm(tangent)
        if size < tol:
            break
        u = np.cos(size) * u + np.sin(size) * tangent / size
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return (sum(alpha * n for n in norms) * u).reshape(xs[0].shape)


def as_torch(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


# --- nuslerp ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("flatten", "row_wise"), [(True, False), (False, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_float64_reference(
    shape: tuple[int, ...], flatten: bool, row_wise: bool, with_base: bool
) -> None:
    rng = np.random.default_rng(hash((shape, flatten, row_wise, with_base)) % 2**32)
    x1, x2, base = (rng.standard_normal(shape) for _ in range(3))
    w1, w2 = 0.3, 0.9
    v1, v2, b = as_torch(x1, x2, base)
    ours = nuslerp(
        v1,
        v2,
        nuslerp_t(w1, w2),
        base=b if with_base else None,
        flatten=flatten,
        row_wise=row_wise,
    )
    expected = nuslerp_reference(
        x1, x2, w1, w2, base if with_base else None, flatten=flatten, row_wise=row_wise
    )
    assert ours.shape == torch.Size(shape) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_nuslerp_by_hand() -> None:
    # weights 1 and 3: t = 3/(1+3) = 0.75. Task vectors [2, 0] and [0, 2] around base [1, 1] are
    # 90 degrees apart (θ = π/2, sin θ = 1): out = base + sin(π/8)·[2, 0] + sin(3π/8)·[0, 2]
    # = [1 + 2·0.3826834, 1 + 2·0.9238795] = [1.7653669, 2.8477591]
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out = nuslerp(
        torch.tensor([3.0, 1.0], dtype=torch.float64),
        torch.tensor([1.0, 3.0], dtype=torch.float64),
        nuslerp_t(1.0, 3.0),
        base=base,
    )
    torch.testing.assert_close(
        out, torch.tensor([1.7653669, 2.8477591], dtype=torch.float64), rtol=0, atol=1e-7
    )
    # per row (flatten false): row 0 is the pair above without base, row 1 a colinear pair
    # ([1, 1] and [2, 2], sin θ = 0), which is lerped: 0.25·[1, 1] + 0.75·[2, 2] = [1.75, 1.75]
    rows = nuslerp(
        torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64),
        torch.tensor([[0.0, 2.0], [2.0, 2.0]], dtype=torch.float64),
        0.75,
        flatten=False,
    )
    torch.testing.assert_close(
        rows,
        torch.tensor([[0.7653669, 1.8477591], [1.75, 1.75]], dtype=torch.float64),
        rtol=0,
        atol=1e-7,
    )


def test_nuslerp_weights_that_cancel_give_the_midpoint() -> None:
    assert nuslerp_t(1.0, -1.0) == 0.5
    assert nuslerp_t(2.0, 0.0) == 0.0


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_edge_cases_match_the_reference(with_base: bool, flatten: bool) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6))
    base = rng.standard_normal((4, 6)) if with_base else None
    origin = 0.0 if base is None else base
    b = None if base is None else torch.from_numpy(base)
    cases = {
        "identical": (x, x),
        "colinear": (x, origin + 2.5 * (x - origin)),
        "one zero vector": (np.zeros_like(x) + origin, x),
        "both zero": (np.zeros_like(x) + origin, np.zeros_like(x) + origin),
    }
    for name, (x1, x2) in cases.items():
        v1, v2 = as_torch(x1, x2)
        ours = nuslerp(v1, v2, nuslerp_t(1.0, 2.0), base=b, flatten=flatten).numpy()
        expected = nuslerp_reference(x1, x2, 1.0, 2.0, base, flatten=flatten)
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12, err_msg=name)
    # opposite task vectors: sin θ = 0, so lerped with t = 2/3: (1/3)·δ + (2/3)·(−δ) = −δ/3.
    # Quarters keep base ± δ exact, so the task vectors are exactly opposite. (Compared by hand:
    # a reading that takes acos of a rounded dot product may land at cos θ = −1 + 1e-16 and
    # take the slerp formula's limit there instead.)
    delta = rng.integers(-8, 8, (4, 6)) / 4.0
    origin = 0.0 if base is None else np.round(base * 4.0) / 4.0
    b = None if base is None else torch.from_numpy(origin)
    v1, v2 = as_torch(origin + delta, origin - delta)
    ours = nuslerp(v1, v2, nuslerp_t(1.0, 2.0), base=b, flatten=flatten).numpy()
    np.testing.assert_allclose(ours, origin - delta / 3, rtol=1e-12, atol=1e-12)


def test_nuslerp_of_a_zero_task_vector_is_not_a_lerp() -> None:
    # MergeKit clamps the norm, so a zero vector is at θ = π/2 from anything: sin(tπ/2)·x
    x = torch.tensor([3.0, -4.0], dtype=torch.float64)
    out = nuslerp(torch.zeros(2, dtype=torch.float64), x, 0.5)
    torch.testing.assert_close(out, np.sin(np.pi / 4) * x)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    w1=st.floats(0.05, 4.0),
    w2=st.floats(0.05, 4.0),
    flatten=st.booleans(),
    row_wise=st.booleans(),
    with_base=st.booleans(),
)
def test_nuslerp_is_symmetric_in_its_two_models(
    seed: int, w1: float, w2: float, flatten: bool, row_wise: bool, with_base: bool
) -> None:
    rng = np.random.default_rng(seed)
    v1, v2, base = as_torch(*(rng.standard_normal((5, 3)) for _ in range(3)))
    options = {"base": base if with_base else None, "flatten": flatten, "row_wise": row_wise}
    forward = nuslerp(v1, v2, nuslerp_t(w1, w2), **options)
    backward = nuslerp(v2, v1, nuslerp_t(w2, w1), **options)
    torch.testing.assert_close(forward, backward, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), flatten=st.booleans(), row_wise=st.booleans())
def test_nuslerp_endpoints_are_the_inputs(seed: int, flatten: bool, row_wise: bool) -> None:
    rng = np.random.default_rng(seed)
    v1, v2 = as_torch(*(rng.standard_normal((4, 7)) for _ in range(2)))
    options = {"flatten": flatten, "row_wise": row_wise}
    torch.testing.assert_close(nuslerp(v1, v2, nuslerp_t(1.0, 0.0), **options), v1)
    torch.testing.assert_close(nuslerp(v1, v2, nuslerp_t(0.0, 1.0), **options), v2)


# --- multislerp ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_float64_reference(
    shape: tuple[int, ...], count: int, with_base: bool, normalize_weights: bool
) -> None:
    rng = np.random.default_rng(hash((shape, count, with_base, normalize_weights)) % 2**32)
    xs = [rng.standard_normal(shape) for _ in range(count)]
    base = rng.standard_normal(shape) if with_base else None
    weights = list(rng.uniform(0.1, 2.0, count))
    ours = multislerp(
        torch.from_numpy(np.stack(xs)),
        torch.tensor(weights, dtype=torch.float64),
        None if base is None else torch.from_numpy(base),
        normalize_weights=normalize_weights,
    )
    expected = multislerp_reference(xs, weights, base, normalize_weights)
    assert ours.shape == torch.Size(shape)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_multislerp_by_hand() -> None:
    # weights 1 and 3 normalise to 0.25 and 0.75; unit vectors [1, 0] and [0, 1] (eps aside);
    # m = [0.25, 0.75], ‖m‖ = √0.625 = 0.7905694; Σ w·n = 0.25·3 + 0.75·4 = 3.75;
    # out = m/‖m‖·3.75 = [1.1858541, 3.5575624]
    out = multislerp(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64), [1.0, 3.0])
    torch.testing.assert_close(
        out, torch.tensor([1.1858541, 3.5575624], dtype=torch.float64), rtol=0, atol=1e-7
    )


def test_multislerp_edge_cases_match_the_reference() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((2, 3, 4))
    base = rng.standard_normal((3, 4))
    zero = np.zeros_like(x)
    cases = {
        "identical": ([x, x, x], [1.0, 2.0, 3.0], None),
        "one zero task vector": ([base, x, y], [1.0, 1.0, 2.0], base),
        "two antipodal, lerped": ([x, -x], [1.0, 1.0], None),
        "two antipodal around a base": ([base + x, base - x], [2.0, 2.0], base),
        "colinear": ([x, 3.0 * x], [1.0, 1.0], None),
        "one input": ([x], [0.5], None),
        "two zeros": ([zero, zero], [1.0, 1.0], None),
    }
    for name, (xs, weights, origin) in cases.items():
        ours = multislerp(
            torch.from_numpy(np.stack(xs)),
            weights,
            None if origin is None else torch.from_numpy(origin),
        )
        expected = multislerp_reference(xs, weights, origin)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-12, err_msg=name)


def test_multislerp_of_three_zero_task_vectors_is_the_base() -> None:
    # MergeKit raises here (its weighted mean direction has norm 0); nothing is opposed, so
    # alloykit returns the base: a tensor the fine-tunes did not change stays unchanged
    base = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="antipodal"):
        multislerp_reference([base.numpy()] * 3, [1.0, 1.0, 1.0], base.numpy())
    out = multislerp(torch.stack([base, base, base]), [1.0, 2.0, 3.0], base)
    assert torch.equal(out, base)


def test_multislerp_more_than_two_opposed_inputs_is_a_one_line_error() -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # x with weight 2 against two copies of −x with weight 1 each: the directions cancel
    with pytest.raises(MergeError, match=r"weighted directions of the 3 inputs cancel") as error:
        multislerp(torch.stack([x, -x, -x]), [2.0, 1.0, 1.0])
    assert "\n" not in str(error.value) and "weights" in str(error.value)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(2, 5),
    with_base=st.booleans(),
    data=st.data(),
)
def test_multislerp_is_symmetric_and_keeps_the_weighted_mean_norm(
    seed: int, count: int, with_base: bool, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    tensors = torch.from_numpy(rng.standard_normal((count, 6, 2)))
    base = torch.from_numpy(rng.standard_normal((6, 2))) if with_base else None
    weights = torch.from_numpy(rng.uniform(0.1, 3.0, count))
    order = data.draw(st.permutations(range(count)))
    out = multislerp(tensors, weights, base)
    permuted = multislerp(tensors[list(order)], weights[list(order)], base)
    torch.testing.assert_close(out, permuted, rtol=1e-12, atol=1e-12)
    # the output's task vector has the weighted mean norm of the inputs' task vectors
    deltas = tensors if base is None else tensors - base
    mean_norm = float((weights / weights.sum()) @ deltas.flatten(1).norm(dim=1))
    result = out if base is None else out - base
    assert float(result.norm()) == pytest.approx(mean_norm, rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 100.0))
def test_multislerp_scales_with_its_inputs(seed: int, scale: float) -> None:
    tensors = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, 8)))
    weights = [0.2, 0.3, 0.5]
    # eps = 0: the eps added to each norm is the one part of the formula that is not homogeneous
    torch.testing.assert_close(
        multislerp(scale * tensors, weights, eps=0.0),
        scale * multislerp(tensors, weights, eps=0.0),
        rtol=1e-12,
        atol=1e-12 * scale,
    )


# --- karcher ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize(("max_iter", "tol"), [(10, 1e-5), (20, 1e-8), (0, 1e-5), (1, 1e-5)])
def test_karcher_matches_float64_reference(
    shape: tuple[int, ...], count: int, max_iter: int, tol: float
) -> None:
    rng = np.random.default_rng(hash((shape, count, max_iter, tol)) % 2**32)
    # fine-tunes of one base point in similar directions; the spread makes the steps count
    center = rng.standard_normal(shape)
    xs = [center + 0.8 * rng.standard_normal(shape) for _ in range(count)]
    ours = karcher(torch.from_numpy(np.stack(xs)), max_iter=max_iter, tol=tol)
    expected = karcher_reference(xs, max_iter, tol)
    assert ours.shape == torch.Size(shape)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_karcher_by_hand() -> None:
    # Directions at 0°, 0° and 90° (norms 2, 1, 3). On a circle the Karcher mean is the mean
    # angle, 30° (the Euclidean start, atan2(1, 2) = 26.6°, is not); one gradient step rotates
    # by the mean angle to it exactly. Scale = (2 + 1 + 3)/3 = 2:
    # out = 2·[cos 30°, sin 30°] = [1.7320508, 1.0]
    xs = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(
        karcher(xs), torch.tensor([1.7320508, 1.0], dtype=torch.float64), rtol=0, atol=1e-7
    )
    # three orthogonal directions: by symmetry u = [1, 1, 1]/√3, scale (1 + 2 + 3)/3 = 2
    out = karcher(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    torch.testing.assert_close(out, torch.full((3,), 2 / np.sqrt(3), dtype=torch.float64))


def test_karcher_edge_cases_match_the_reference() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((2, 5, 3))
    zero = np.zeros_like(x)
    cases = {
        "identical": [x, x, x],
        "one zero input": [x, zero, y],
        "all zero": [zero, zero, zero],
        "antipodal pair": [x, -x],
        "colinear": [x, 2.0 * x, 0.5 * x],
        "one input": [y],
        "one element": [np.array([2.0]), np.array([3.0]), np.array([0.5])],
    }
    for name, xs in cases.items():
        ours = karcher(torch.from_numpy(np.stack(xs)))
        np.testing.assert_allclose(
            ours.numpy(), karcher_reference(xs), rtol=1e-9, atol=1e-12, err_msg=name
        )


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), count=st.integers(2, 6), data=st.data())
def test_karcher_is_symmetric_and_keeps_the_mean_norm(
    seed: int, count: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    tensors = torch.from_numpy(rng.standard_normal((count, 4, 3)) + 1.0)
    order = data.draw(st.permutations(range(count)))
    out = karcher(tensors, max_iter=50, tol=1e-10)
    torch.testing.assert_close(
        out, karcher(tensors[list(order)], max_iter=50, tol=1e-10), rtol=1e-8, atol=1e-10
    )
    assert float(out.norm()) == pytest.approx(float(tensors.flatten(1).norm(dim=1).mean()))
    # converged: the mean direction is where the Riemannian gradient vanishes
    units = tensors.flatten(1) / tensors.flatten(1).norm(dim=1, keepdim=True)
    u = out.flatten() / out.norm()
    theta = torch.acos((units @ u).clamp(-1, 1))
    gradient = (
        (theta / torch.sin(theta)).unsqueeze(1) * (units - (units @ u).unsqueeze(1) * u)
    ).sum(0)
    assert float(gradient.norm()) < 1e-8


# --- all three -------------------------------------------------------------------------------


def run_each(tensors: torch.Tensor, base: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each method on the same inputs (nuslerp on the first two), with weights summing to one."""
    weights = torch.linspace(1.0, 2.0, tensors.shape[0], dtype=torch.float64)
    weights = weights / weights.sum()
    return {
        "nuslerp": nuslerp(
            tensors[0], tensors[1], nuslerp_t(float(weights[0]), float(weights[1])), base=base
        ),
        "nuslerp rows": nuslerp(tensors[0], tensors[1], 0.3, base=base, flatten=False),
        "nuslerp columns": nuslerp(
            tensors[0], tensors[1], 0.3, base=base, flatten=False, row_wise=True
        ),
        "multislerp": multislerp(tensors, weights, base),
        "karcher": karcher(tensors if base is None else torch.cat([tensors, base[None]])),
    }


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(2, 4),
    with_base=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    magnitude=st.floats(1e-3, 1e3),
)
def test_identical_models_are_returned_bit_for_bit(
    seed: int, count: int, with_base: bool, dtype: type, magnitude: float
) -> None:
    values = np.random.default_rng(seed).standard_normal((6, 5)) * magnitude
    x = torch.from_numpy(values.astype(dtype))
    stack = x.expand(count, *x.shape).clone()
    for name, out in run_each(stack, x.clone() if with_base else None).items():
        assert torch.equal(out, x), name


@settings(max_examples=30, deadline=None)
@given(value=st.floats(-100, 100).filter(lambda v: abs(v) > 1e-3), count=st.integers(2, 4))
def test_a_constant_tensor_is_kept(value: float, count: int) -> None:
    constant = torch.full((count, 3, 4), value, dtype=torch.float32)
    for name, out in run_each(constant, None).items():
        torch.testing.assert_close(out, constant[0], rtol=1e-6, atol=0, msg=name)


def test_float32_is_within_float32_rounding_of_the_float64_result() -> None:
    rng = np.random.default_rng(11)
    tensors = rng.standard_normal((3, 64, 48))
    base = rng.standard_normal((64, 48))
    wide = run_each(torch.from_numpy(tensors), torch.from_numpy(base))
    narrow = run_each(
        torch.from_numpy(tensors.astype(np.float32)), torch.from_numpy(base.astype(np.float32))
    )
    for name, out in narrow.items():
        assert out.dtype == torch.float32, name
        np.testing.assert_allclose(
            out.double().numpy(), wide[name].numpy(), atol=2e-6, err_msg=name
        )


def test_results_do_not_depend_on_the_thread_count() -> None:
    # long enough that torch would split a plain reduction across threads
    generator = torch.Generator().manual_seed(0)
    tensors = torch.randn(3, 8, 40_000, generator=generator)
    base = torch.randn(8, 40_000, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_each(tensors, base)
        torch.set_num_threads(max(4, threads))
        many = run_each(tensors, base)
    finally:
        torch.set_num_threads(threads)
    for name, out in one.items():
        assert torch.equal(out, many[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = torch.randn(3, 32, 16, generator=generator)
    base = torch.randn(32, 16, generator=generator)
    on_cpu = run_each(tensors, base)
    on_gpu = run_each(tensors.cuda(), base.cuda())
    for name, out in on_gpu.items():
        assert out.device.type == "cuda", name
        torch.testing.assert_close(out.cpu(), on_cpu[name], rtol=1e-5, atol=1e-6, msg=name)


# --- through a merge config ------------------------------------------------------------------


def config(
    family: dict[str, Path], method: str, models: dict[str, float | None], **top: object
) -> dict[str, object]:
    """A ``models:`` recipe over the toy family; a None weight leaves ``parameters`` out."""
    entries = [
        {"model": str(family[name])} | ({} if w is None else {"parameters": {"weight": w}})
        for name, w in models.items()
    ]
    return {"merge_method": method, "models": entries, "dtype": "float32", **top}


def test_karcher_takes_a_configured_base_as_one_more_input(family: dict[str, Path]) -> None:
    # every tensor, the embeddings and the head included (same vocabulary in every toy model)
    recipe = config(family, "karcher", {"ft1": None, "ft2": None}, base_model=str(family["base"]))
    merged = merge_to_state_dict(recipe)
    inputs = [load_tensors(family[name]) for name in ("ft1", "ft2", "base")]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(merged)
    for name, out in merged.items():
        stack = torch.from_numpy(np.stack([m[name] for m in inputs]).astype(np.float32))
        assert torch.equal(out, karcher(stack)), name


def test_nuslerp_and_multislerp_with_a_base_merge_task_vectors(family: dict[str, Path]) -> None:
    weights = {"ft1": 2.0, "ft2": 1.0}
    base = str(family["base"])
    nu = merge_to_state_dict(config(family, "nuslerp", weights, base_model=base))
    multi = merge_to_state_dict(config(family, "multislerp", weights, base_model=base))
    tensors = {name: load_tensors(family[name]) for name in ("base", "ft1", "ft2")}
    for name in nu:
        b, x1, x2 = (torch.from_numpy(tensors[m][name].astype(np.float32)) for m in tensors)
        assert torch.equal(nu[name], nuslerp(x1, x2, 1 / 3, base=b)), name
        assert torch.equal(multi[name], multislerp(torch.stack([x1, x2]), [2.0, 1.0], b)), name


def test_nuslerp_takes_exactly_two_models_besides_a_distinct_base(family: dict[str, Path]) -> None:
    three = config(family, "nuslerp", {"ft1": 1.0, "ft2": 1.0, "ft3": 1.0})
    with pytest.raises(AlloyError, match="nuslerp takes at most 2 models besides the base, got 3"):
        merge_to_state_dict(three)
    base_among_them = config(
        family, "nuslerp", {"ft1": 1.0, "ft2": 1.0}, base_model=str(family["ft1"])
    )
    with pytest.raises(AlloyError, match="nuslerp needs at least 2 models besides the base"):
        merge_to_state_dict(base_among_them)


def test_multislerp_weights_that_cancel_are_a_config_error(family: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="weights sum to 0, and normalize_weights: true"):
        merge_to_state_dict(config(family, "multislerp", {"ft1": 1.0, "ft2": -1.0}))
    # without normalising there is nothing to divide by
    merge_to_state_dict(
        config(
            family, "multislerp", {"ft1": 1.0, "ft2": -1.0}, parameters={"normalize_weights": False}
        )
    )
