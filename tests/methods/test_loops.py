"""The fused CPU loops (alloykit.methods._loops) give the torch path's results.

Every test runs the same call twice, with the fused loops and with them switched off
(``ALLOYKIT_FUSED=0`` semantics, through ``_import_loops``), on tensors large enough for the
sampled selection and several parallel chunks, with heavy ties (values on a coarse grid, as
bfloat16 task vectors have).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from alloykit.methods import task_vectors as tv

pytest.importorskip("numba")

N = 700_001  # > 4 x the selection sample, 11 chunks of 65 536, and a ragged last chunk


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Run a thunk with the fused loops switched off."""

    def run(thunk: Callable[[], Any]) -> Any:
        with monkeypatch.context() as patch:
            patch.setattr(tv, "_import_loops", lambda: None)
            return thunk()

    yield run


def _coarse(seed: int, n: int = N, k: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (k, n)
    # a grid of 1/64 steps: thousands of entries share each magnitude, zeros included
    return torch.round(torch.randn(shape, generator=generator) * 64) / 64


def test_loops_are_used() -> None:
    assert tv.fused_loops(torch.zeros(3)) is not None
    assert tv.fused_loops(torch.zeros(3, dtype=torch.bfloat16)) is None
    assert tv.fused_loops(torch.zeros(4, 4).t()) is None  # not contiguous


@pytest.mark.parametrize("density", [0.0001, 0.1, 0.5, 0.9, 0.999])
def test_magnitude_cut_and_keep_match(density: float, torch_path: Any) -> None:
    flat = _coarse(1)
    k = max(1, int(density * N))
    cut = tv.magnitude_cut(flat, k)
    assert cut == torch_path(lambda: tv.magnitude_cut(flat, k))
    assert cut is not None and cut.ties > 0  # the tie rule is exercised
    fused, reference = flat.clone(), flat.clone()
    tv.keep_top_(fused, cut)
    torch_path(lambda: tv.keep_top_(reference, cut))
    assert torch.equal(fused, reference)
    assert int(torch.count_nonzero(fused)) == min(k, int(torch.count_nonzero(flat)))


def test_kth_largest_matches_kthvalue(torch_path: Any) -> None:
    flat = _coarse(2)
    for k in (1, 17, N // 3, N - 5):
        expected = float(torch.kthvalue(flat, N - k + 1).values)
        assert (
            tv.kth_largest(flat, k) == expected == torch_path(lambda k=k: tv.kth_largest(flat, k))
        )


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.9, 0.05), (0.2, 0.0), (0.99, 0.01)])
def test_breadcrumbs_band_matches(density: float, gamma: float, torch_path: Any) -> None:
    delta = _coarse(3, n=700_000).view(100, 7000)
    fused = tv.sparsify(delta, "breadcrumbs", density=density, gamma=gamma)
    reference = torch_path(lambda: tv.sparsify(delta, "breadcrumbs", density=density, gamma=gamma))
    assert torch.equal(fused, reference)
    assert int(torch.count_nonzero(fused)) <= int(density * delta.numel())


@pytest.mark.parametrize("elect", ["none", "mass", "count"])
@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("scale", [0.7, 1.0])
def test_elect_combine_matches(
    elect: str, combine: str, normalize: bool, scale: float, torch_path: Any
) -> None:
    deltas = _coarse(4, n=200_003, k=3)
    deltas[:, :1000] = 0.0  # zero totals and entries with no sign
    deltas[1, 1000:2000] = -deltas[0, 1000:2000]  # exact cancellations: a zero mass elects +
    weights = torch.tensor([1.0, 0.8, 0.3])
    steps = tv.Steps(elect=elect, combine=combine, normalize=normalize, scale=scale)  # type: ignore[arg-type]
    fused = tv.merge_deltas(deltas.clone(), weights, steps)
    reference = torch_path(lambda: tv.merge_deltas(deltas.clone(), weights, steps))
    assert torch.equal(fused, reference)


def test_ties_merge_matches_in_float64(torch_path: Any) -> None:
    base = torch.randn(300_000, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    tuned = base + _coarse(6, n=300_000, k=3).double()

    def merge() -> torch.Tensor:
        return tv.merge_task_vectors(
            base,
            tuned,
            torch.tensor([1.0, 0.5, 0.25]),
            torch.tensor([0.5, 0.3, 0.7]),
            sparsify="magnitude",
            elect="mass",
            normalize=True,
        )

    assert torch.equal(merge(), torch_path(merge))


def test_counter_draws_are_uniform_and_the_same_on_both_paths() -> None:
    from alloykit.methods import _loops

    key = tv.draw_key(torch.Generator().manual_seed(3), torch.device("cpu"))
    draws = tv.counter_uniform(key, 5, 1 << 20, torch.device("cpu"))
    fused = torch.empty(1 << 20)
    _loops.uniform_fill(fused.numpy(), key, 5)
    assert torch.equal(draws, fused)
    # uniform on [0, 1): 64 bins within 5 standard deviations, mean and first-lag correlation
    counts = torch.histc(draws, bins=64, min=0.0, max=1.0)
    expected = draws.numel() / 64
    assert float((counts - expected).abs().max()) < 5 * expected**0.5
    assert abs(float(draws.double().mean()) - 0.5) < 1e-3
    centred = draws.double() - 0.5
    assert abs(float((centred[1:] * centred[:-1]).mean())) < 1e-3
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    # another key, or the next block of this one, draws differently
    other = tv.counter_uniform(key + 1, 5, 1000, torch.device("cpu"))
    assert not torch.equal(other, draws[:1000])


@pytest.mark.parametrize(
    "method,shape,dtype",
    [
        ("random", (500, 1000), torch.float32),
        ("random", (3, 100_001), torch.float32),  # an odd count: the last draw is unpaired
        ("della", (500, 1000), torch.float32),
        ("della", (300_000,), torch.float32),  # one row
        ("della", (3000, 1), torch.float32),  # rows of one entry
        ("della", (64, 8, 250), torch.float64),  # ranked along the flattened dims 1..
        ("della", (700, 1100), None),  # untied values: many entries need exact counting
        ("della", (301, 777), torch.float32),  # odd rows: draws start at odd offsets
    ],
)
def test_random_draws_match_across_paths(
    method: str, shape: tuple[int, ...], dtype: torch.dtype | None, torch_path: Any
) -> None:
    if dtype is None:
        delta = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    else:
        delta = _coarse(7, n=500_000)[: torch.Size(shape).numel()].view(shape).to(dtype)

    def run() -> torch.Tensor:
        return tv.sparsify(
            delta,
            method,  # type: ignore[arg-type]
            density=0.4,
            epsilon=0.1,
            generator=torch.Generator().manual_seed(11),
            rescale="l1",
        )

    fused = run()
    reference = torch_path(run)
    assert torch.equal(fused, reference)
    assert torch.equal(torch.signbit(fused), torch.signbit(reference))  # zeros' signs too
    kept = int(torch.count_nonzero(fused)) / int(torch.count_nonzero(delta))
    assert abs(kept - 0.4) < 0.01


def test_merge_check_sums_match(torch_path: Any) -> None:
    from alloykit.inspect.merge_checks import TaskVectorChecks
    from alloykit.plan import TensorInput, TensorJob

    generator = torch.Generator().manual_seed(7)
    base = torch.randn(700, 1001, generator=generator) * 0.02
    tensors = base + torch.randn(3, 700, 1001, generator=generator) * 0.002
    tensors[2] = base  # a zero task vector
    inputs = tuple(TensorInput(m, "w") for m in "abc")
    job = TensorJob("w", (700, 1001), "F32", "ties", inputs, TensorInput("base", "w"), {}, {}, 0)

    def sums() -> TaskVectorChecks:
        checks = TaskVectorChecks(list("abc"))
        checks.observe(job, tensors, base)
        checks.observe(job, tensors[:, 0], base[0])  # a 1-D tensor: no shared-base sums
        return checks

    fused, reference = sums(), torch_path(sums)
    for name in ("_delta_sq", "_matrix_delta_sq", "_weight_sq", "_dot_base", "_base_sq"):
        got, want = getattr(fused, name), getattr(reference, name)
        assert got.keys() == want.keys()
        for model in got:
            assert got[model] == pytest.approx(want[model], rel=1e-5, abs=0.0)
    assert fused._delta_sq["c"] == 0.0 and fused._seen == reference._seen
    assert fused.warnings() == reference.warnings()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_radix_select_matches_partition(dtype: Any) -> None:
    from alloykit.methods import _loops

    unsigned = np.uint32 if dtype == np.float32 else np.uint64
    rng = np.random.default_rng(3)
    for trial in range(150):
        n = int(rng.integers(1, 3000))
        # coarse grids (heavy ties), signed zeros and infinities
        x = (np.round(rng.standard_normal(n) * rng.choice([1, 8, 64])) / 8).astype(dtype)
        if trial % 3 == 0:
            x[rng.integers(0, n, size=n // 3)] = -0.0
        if trial % 5 == 0:
            x[: n // 4], x[n // 4 : n // 3] = np.inf, -np.inf
        rank = int(rng.integers(1, n + 1))
        bits, above = _loops.select(x.view(unsigned), rank, 8 * x.itemsize)
        value = np.array([bits], dtype=np.uint64).astype(unsigned).view(dtype)[0]
        expected = np.partition(x.copy(), rank - 1)[rank - 1]
        assert value == expected
        assert above == int(np.count_nonzero(x > expected))


@pytest.mark.parametrize("n", [1, 8192, 8193, 70_000, N, 3 * (1 << 21) + 5])
def test_stable_norm_sums_match(n: int, torch_path: Any) -> None:
    flat = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.01
    flat[: n // 3] = -flat[: n // 3]
    assert tv.stable_abs_sum(flat) == torch_path(lambda: tv.stable_abs_sum(flat))
    assert tv.stable_square_sum(flat) == torch_path(lambda: tv.stable_square_sum(flat))
    assert tv.stable_abs_sum(flat) == tv.stable_sum_of(flat, torch.abs)


@pytest.mark.parametrize("first,second", [(630_000, 7000), (700_001, 7000), (350_000, 0), (1, 2)])
def test_paired_cuts_are_the_single_cuts(first: int, second: int) -> None:
    flat = _coarse(11)
    assert tv.magnitude_cuts(flat, first, second) == (
        tv.magnitude_cut(flat, first),
        tv.magnitude_cut(flat, second),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("similar", [False, True])  # True: nearly colinear, the lerp branch
def test_slerp_combine_matches(dtype: Any, similar: bool, torch_path: Any) -> None:
    from alloykit.methods.spherical import slerp

    generator = torch.Generator().manual_seed(5)
    v0 = torch.randn(N, generator=generator, dtype=dtype)
    v1 = (
        (v0 + 0.01 * torch.randn(N, generator=generator, dtype=dtype))
        if similar
        else (torch.randn(N, generator=generator, dtype=dtype))
    )
    fused = slerp(v0, v1, 0.3)
    plain = torch_path(lambda: slerp(v0, v1, 0.3))
    assert torch.equal(fused, plain)
    assert fused.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1e-9])  # 1e-9: norms below epsilon, no division
def test_slerp_unit_dot_matches(dtype: Any, scale: float, torch_path: Any) -> None:
    from alloykit.methods.spherical import _norm, _unit_dot

    generator = torch.Generator().manual_seed(6)
    v0 = torch.randn(N, generator=generator, dtype=dtype) * scale
    v1 = torch.randn(N, generator=generator, dtype=dtype)
    n0, n1 = _norm(v0), _norm(v1)
    assert _unit_dot(v0, n0, v1, n1) == torch_path(lambda: _unit_dot(v0, n0, v1, n1))
