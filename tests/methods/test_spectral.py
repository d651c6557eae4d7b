"""tsv, iso_c, iso_cts: float64 NumPy references written from the papers, golden cases, memory.

* TSV-M (Gargiulo et al. 2025, CVPR, arXiv:2412.00081): per task the top ⌊r/T⌋ singular
  triplets; U, V concatenated and replaced by their nearest orthonormal matrices;
  τ = ⊥(U) S ⊥(V)ᵀ.
* Iso-C (Marczak et al. 2025, ICML, arXiv:2502.04959): Σ τ_i = U S Vᵀ, τ = mean(S)·U Vᵀ.
* Iso-CTS (same paper): common top-k_c of Σ τ_i plus per task the top k of the residual after
  projecting out the common space; orthogonalise; flat spectrum.

Not-2-D tensors: the mean task vector. θ = θ0 + α τ.

The references use NumPy's LAPACK SVD in float64 and a fixed relative rank cut of 1e-9 (the
kernels: torch, ``max(m, n)·eps``); Iso-C's ``U Vᵀ`` is the polar factor of the sum itself.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.methods import METHODS
from alloykit.methods.registry import MethodInputs
from alloykit.methods.spectral import iso_c, iso_cts, run_iso_c, run_iso_cts, run_tsv, tsv_merge

RTOL, ATOL = 1e-9, 1e-10


def ref_polar(a: np.ndarray) -> np.ndarray:
    """Polar factor on the range: P Qᵀ over the nonzero singular values of A = P Σ Qᵀ."""
    p, sigma, qt = np.linalg.svd(a, full_matrices=False)
    keep = sigma > 1e-9 * max(sigma.max(initial=0.0), 1e-300)
    return p[:, keep] @ qt[keep]


def ref_top(
    matrix: np.ndarray, count: int, scale: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``count`` singular triplets whose value is not rounding noise.

    Noise is relative to ``scale`` (default: the largest singular value): Iso-CTS compares the
    residuals after projection with the size of the task vectors, not with themselves.
    """
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    reference = s.max(initial=0.0) if scale is None else scale
    nonzero = int((s > 1e-9 * max(reference, 1e-300)).sum())
    count = min(count, nonzero)
    return u[:, :count], s[:count], vt[:count]


def ref_mean(base: np.ndarray, tuned: np.ndarray, alpha: float) -> np.ndarray:
    return base + alpha * (tuned - base).mean(axis=0)


def ref_tsv(base: np.ndarray, tuned: np.ndarray, alpha: float) -> np.ndarray:
    tasks = tuned.shape[0]
    if base.ndim != 2 or min(base.shape) // tasks == 0:
        return ref_mean(base, tuned, alpha)
    k = min(base.shape) // tasks
    pieces = [ref_top(x - base, k) for x in tuned]
    if sum(p[1].size for p in pieces) == 0:
        return base.copy()
    u = np.hstack([p[0] for p in pieces])
    s = np.concatenate([p[1] for p in pieces])
    vt = np.vstack([p[2] for p in pieces])
    return base + alpha * ref_polar(u) @ np.diag(s) @ ref_polar(vt.T).T


def ref_iso_c(base: np.ndarray, tuned: np.ndarray, alpha: float) -> np.ndarray:
    if base.ndim != 2:
        return ref_mean(base, tuned, alpha)
    total = (tuned - base).sum(axis=0)
    s = np.linalg.svd(total, compute_uv=False)
    s = s[s > 1e-9 * max(s.max(initial=0.0), 1e-300)]
    if s.size == 0:
        return base.copy()
    return base + alpha * s.mean() * ref_polar(total)


def ref_iso_cts(base: np.ndarray, tuned: np.ndarray, alpha: float, fraction: float) -> np.ndarray:
    if base.ndim != 2:
        return ref_mean(base, tuned, alpha)
    tasks = tuned.shape[0]
    r = min(base.shape)
    # the authors' sizes: common = int(r f), the rest rounded to a multiple of T
    per_task = round((r - int(r * fraction)) / tasks)
    if per_task * tasks > r:
        per_task = r // tasks
    common = r - per_task * tasks
    deltas = tuned - base
    scale = max(np.linalg.norm(m) for m in [deltas.sum(axis=0), *deltas])
    uc, sc, vct = ref_top(deltas.sum(axis=0), common, scale)
    us, ss, vts = [uc], [sc], [vct]
    for delta in deltas:
        u, s, vt = ref_top(delta - uc @ (uc.T @ delta), per_task, scale)
        us.append(u)
        ss.append(s)
        vts.append(vt)
    s_all = np.concatenate(ss)
    if s_all.size == 0:
        return base.copy()
    u_all, vt_all = np.hstack(us), np.vstack(vts)
    return base + alpha * s_all.mean() * ref_polar(u_all) @ ref_polar(vt_all.T).T


Kernel = Callable[..., torch.Tensor]
CASES: list[tuple[str, Kernel, Callable[..., np.ndarray]]] = [
    ("tsv", tsv_merge, ref_tsv),
    ("iso_c", iso_c, ref_iso_c),
    ("iso_cts", lambda b, x, a: iso_cts(b, x, a, 0.8), lambda b, x, a: ref_iso_cts(b, x, a, 0.8)),
]
SHAPES = [(1,), (7,), (2, 3, 4), (1, 1), (1, 6), (6, 1), (5, 3), (3, 5), (8, 8), (17, 11)]


def _random(shape: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    return base, base + rng.standard_normal((n, *shape))


def _run(kernel: Kernel, base: np.ndarray, tuned: np.ndarray, alpha: float) -> np.ndarray:
    return kernel(torch.from_numpy(base), torch.from_numpy(tuned), alpha).numpy()


@pytest.mark.parametrize(("name", "kernel", "reference"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_float64_reference(
    name: str, kernel: Kernel, reference: Callable[..., np.ndarray], shape: tuple[int, ...], n: int
) -> None:
    base, tuned = _random(shape, n, seed=n * 1000 + sum(shape) * 7 + len(name))
    for alpha in (1.0, 0.4):
        np.testing.assert_allclose(
            _run(kernel, base, tuned, alpha),
            reference(base, tuned, alpha),
            rtol=RTOL,
            atol=ATOL,
            err_msg=f"{name} {shape} n={n} alpha={alpha}",
        )


@pytest.mark.parametrize(("name", "kernel", "reference"), CASES, ids=[c[0] for c in CASES])
def test_rank_deficient_identical_and_zero_task_vectors(
    name: str, kernel: Kernel, reference: Callable[..., np.ndarray]
) -> None:
    rng = np.random.default_rng(5)
    base = rng.standard_normal((9, 7))
    # rank 2 task matrices: their null-space singular vectors are arbitrary
    low_rank = np.stack(
        [rng.standard_normal((9, 2)) @ rng.standard_normal((2, 7)) for _ in range(3)]
    )
    identical = np.stack([low_rank[0]] * 3)
    for deltas in (low_rank, identical, np.stack([low_rank[0], -low_rank[0]])):
        tuned = base + deltas
        np.testing.assert_allclose(
            _run(kernel, base, tuned, 1.0), reference(base, tuned, 1.0), rtol=1e-8, atol=1e-9
        )
    # zero task vectors: the base, bit for bit
    b = torch.from_numpy(base)
    assert torch.equal(kernel(b, b.expand(3, 9, 7).clone(), 1.0), b)


def test_tsv_golden_cases() -> None:
    # tasks on orthogonal axes: τ_1 = diag(3, 0), τ_2 = diag(0, 2); k = ⌊2/2⌋ = 1 each:
    # U = [e1 e2] = I, S = diag(3, 2), V = I, already orthonormal -> diag(3, 2)
    tuned = torch.tensor([[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(
        tsv_merge(torch.zeros(2, 2, dtype=torch.float64), tuned), tuned.sum(0)
    )
    # overlapping directions: τ_1 = 2·e1 e1ᵀ, τ_2 = u uᵀ with u at 45°. U = [e1 u] has columns at
    # 0° and 45°; its nearest orthonormal matrix spreads them to -22.5° and 67.5°:
    # w1 = (c, -s), w2 = (s, c), c = cos 22.5° = sqrt(2+√2)/2, s = sin 22.5° = sqrt(2-√2)/2.
    # V = U (symmetric tasks), so out = 2·w1 w1ᵀ + 1·w2 w2ᵀ
    #     = [[2c² + s², -cs], [-cs, 2s² + c²]], c² = 0.8535534, s² = 0.1464466, cs = √2/4.
    u = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    tuned = torch.stack(
        [
            2 * torch.outer(torch.tensor([1.0, 0.0]).double(), torch.tensor([1.0, 0.0]).double()),
            torch.outer(u, u),
        ]
    )
    c2, s2, cs = (2 + math.sqrt(2)) / 4, (2 - math.sqrt(2)) / 4, math.sqrt(2) / 4
    expected = torch.tensor([[2 * c2 + s2, -cs], [-cs, 2 * s2 + c2]], dtype=torch.float64)
    torch.testing.assert_close(tsv_merge(torch.zeros(2, 2, dtype=torch.float64), tuned), expected)


def test_iso_golden_cases() -> None:
    # Iso-C: τ_1 = [[0, 2], [0, 0]], τ_2 = [[0, 0], [1, 0]]; the sum [[0, 2], [1, 0]] has singular
    # values 2 and 1 (mean 1.5) and U Vᵀ = [[0, 1], [1, 0]] -> 1.5·[[0, 1], [1, 0]]
    base = torch.full((2, 2), 10.0, dtype=torch.float64)
    deltas = torch.tensor([[[0.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    expected = base + torch.tensor([[0.0, 1.5], [1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(iso_c(base, base + deltas), expected)
    # Iso-CTS on 3×3, f = 0.34: common = int(1.02) = 1, k = round(2/2) = 1 per task.
    # τ_1 = diag(4, 1, 0), τ_2 = diag(4, 0, 2); sum diag(8, 1, 2): common direction e1 (σ 8);
    # residuals diag(0, 1, 0) -> e2 (σ 1) and diag(0, 0, 2) -> e3 (σ 2); mean 11/3; U = V = I
    deltas = torch.stack(
        [torch.diag(torch.tensor(d, dtype=torch.float64)) for d in ([4.0, 1, 0], [4.0, 0, 2])]
    )
    torch.testing.assert_close(
        iso_cts(torch.zeros(3, 3, dtype=torch.float64), deltas, 1.0, 0.34),
        torch.eye(3, dtype=torch.float64) * 11 / 3,
    )
    # a 1-D tensor (a norm) is averaged: base + α·mean τ = 1 + 0.5·(2 + 4)/2 = 2.5
    torch.testing.assert_close(
        iso_cts(
            torch.ones(1, dtype=torch.float64),
            torch.tensor([[3.0], [5.0]], dtype=torch.float64),
            0.5,
        ),
        torch.tensor([2.5], dtype=torch.float64),
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    n=st.integers(1, 4),
    alpha=st.floats(-2, 2),
)
def test_properties(seed: int, rows: int, cols: int, n: int, alpha: float) -> None:
    base, tuned = _random((rows, cols), n, seed)
    b, x = torch.from_numpy(base), torch.from_numpy(tuned)
    rotation = torch.from_numpy(
        np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, rows)))[0]
    )
    for name, kernel, _ in CASES:
        out = kernel(b, x, alpha)
        # the output is linear in α
        torch.testing.assert_close(out - b, alpha * (kernel(b, x, 1.0) - b), rtol=1e-9, atol=1e-9)
        # rotating every task vector on the left rotates the merge (no basis is preferred)
        rotated = kernel(b, b + torch.einsum("ij,kjl->kil", rotation, x - b), alpha)
        torch.testing.assert_close(
            rotated - b, rotation @ (out - b), rtol=1e-7, atol=1e-8, msg=name
        )
        # the order of the models does not matter (up to rounding)
        permutation = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        torch.testing.assert_close(
            kernel(b, x[permutation], alpha), out, rtol=1e-7, atol=1e-8, msg=name
        )
    # Iso-C's merged task matrix has a flat spectrum
    s = np.linalg.svd((iso_c(b, x, 1.0) - b).numpy(), compute_uv=False)
    s = s[s > 1e-9 * max(s.max(), 1e-300)]
    if s.size:
        np.testing.assert_allclose(s, s.mean(), rtol=1e-9)
    # TSV-M of one model gives the model back
    torch.testing.assert_close(tsv_merge(b, x[:1], 1.0), x[0], rtol=1e-9, atol=1e-9)


def test_float32_within_rounding_of_the_reference() -> None:
    base, tuned = _random((48, 40), 3, seed=21)
    b32, x32 = torch.from_numpy(base.astype(np.float32)), torch.from_numpy(tuned.astype(np.float32))
    for name, kernel, reference in CASES:
        out = kernel(b32, x32, 1.0)
        assert out.dtype == torch.float32
        expected = reference(b32.double().numpy(), x32.double().numpy(), 1.0)
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-4, err_msg=name)


def test_adapters_and_registry_rows() -> None:
    base, tuned = _random((6, 5), 2, seed=3)
    inputs = MethodInputs(
        tensors=torch.from_numpy(tuned),
        base=torch.from_numpy(base),
        per_model={},
        params={"alpha": 0.7, "common_space_fraction": 0.5},
    )
    np.testing.assert_allclose(
        run_tsv(inputs).numpy(), ref_tsv(base, tuned, 0.7), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        run_iso_c(inputs).numpy(), ref_iso_c(base, tuned, 0.7), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        run_iso_cts(inputs).numpy(), ref_iso_cts(base, tuned, 0.7, 0.5), rtol=RTOL, atol=ATOL
    )
    defaults = {
        name: {p.name: p.default for p in METHODS[name].params}
        for name in ("tsv", "iso_c", "iso_cts")
    }
    assert defaults == {
        "tsv": {"alpha": 1.0},
        "iso_c": {"alpha": 1.0},
        "iso_cts": {"alpha": 1.0, "common_space_fraction": 0.8},
    }


# ------------------------------------------------------------------------------------ memory

# Peak memory per 2-D tensor, besides the inputs: at most three matrices of the tensor's size
# held by the kernel (the running sum or one task matrix, and the concatenated left and right
# singular vectors) plus one LAPACK SVD at a time (its copy of the input, U and Vᵀ, and gesdd's
# workspace): about seven matrices whatever the number of models. Measured on a 2-core CPU,
# 3 models: tsv +5.8 matrices (261 s), iso_c +4.2 (20 s). The bound allows 8 plus 64 MiB of
# thread-pool and allocator slack; a kernel stacking the k task vectors (3 more) or keeping
# every task's full SVD (6 more) fails it.
MEMORY_BOUND_MATRICES = 8
MEMORY_SLACK_BYTES = 64 * 2**20
CHILD = textwrap.dedent(
    """
    import resource, sys, time, torch
    from alloykit.methods.spectral import iso_c, tsv_merge
    kernel = {"tsv": tsv_merge, "iso_c": iso_c}[sys.argv[1]]
    rows, cols, models = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=generator)
    tensors = base + 0.01 * torch.randn(models, rows, cols, generator=generator)
    torch.linalg.svd(torch.randn(64, 64), full_matrices=False)  # load LAPACK and thread pools
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    out = kernel(base, tensors, 1.0)
    assert out.shape == (rows, cols) and bool(torch.isfinite(out).all())
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(growth, time.perf_counter() - start)
    """
)


SLOW = pytest.mark.skipif(
    os.environ.get("ALLOYKIT_SLOW_TESTS") != "1",
    reason="five 4k SVDs: over a minute on 2 cores; run with ALLOYKIT_SLOW_TESTS=1",
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize("name", [pytest.param("tsv", marks=SLOW), "iso_c"])
def test_large_matrix_peak_memory_is_bounded(name: str) -> None:
    """A 4097×4100 float32 matrix, 3 models, in a fresh child process (iso_c: one SVD, ~25 s
    on 2 cores, always run; tsv: five SVDs, opt-in with ALLOYKIT_SLOW_TESTS=1)."""
    rows, cols, models = 4097, 4100, 3
    source = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(rows), str(cols), str(models)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(source)},
    )
    growth, seconds = result.stdout.split()
    matrix_bytes = rows * cols * 4
    bound = MEMORY_BOUND_MATRICES * matrix_bytes + MEMORY_SLACK_BYTES
    print(f"{name}: +{int(growth) / matrix_bytes:.2f} matrices in {float(seconds):.0f} s")  # -s
    assert int(growth) <= bound, (
        f"{name}: peak RSS grew by {int(growth) / matrix_bytes:.1f} matrices "
        f"({int(growth) / 2**20:.0f} MiB in {float(seconds):.0f} s), bound {bound / 2**20:.0f} MiB"
    )
