"""PCB-merging: a float64 NumPy reading of the authors' released steps, with sorts.

The reference follows Du et al. 2024 (arXiv:2410.02396) as released in ``pcb-merging.py``:
clip magnitudes at the sorted row's ``⌊d·c⌋`` and ``⌊d·(1−c)⌋ − 1`` entries, intra =
``exp(k·minmax²)``, inter = ``tanh(τ_i·Στ)``, drop below the sorted score's ``⌊d·(1−r)⌋``
entry, min-max rescale, score-weighted average. It sorts (the kernel uses kthvalue) and
evaluates ``exp(k·m²)`` unshifted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from alloykit import merge_to_state_dict
from alloykit.methods import METHODS, MethodInputs
from alloykit.methods.pcb import pcb, pcb_scores, run_pcb


def ref_minmax(rows: np.ndarray) -> np.ndarray:
    low = rows.min(axis=1, keepdims=True)
    high = rows.max(axis=1, keepdims=True)
    return (rows - low) / (high - low)


def ref_pcb(
    base: np.ndarray,
    tuned: np.ndarray,
    weights: np.ndarray,
    ratio: float,
    clamp_ratio: float,
    scale: float,
) -> np.ndarray:
    k = tuned.shape[0]
    deltas = (tuned - base).reshape(k, -1)
    d = deltas.shape[1]
    magnitudes = np.abs(deltas)
    ordered = np.sort(magnitudes, axis=1)
    low = ordered[:, int(d * clamp_ratio)][:, None]
    high = ordered[:, int(d * (1 - clamp_ratio)) - 1][:, None]
    clipped = np.clip(magnitudes, low, high)
    intra = np.exp(k * ref_minmax(clipped) ** 2)
    inter = np.tanh(deltas * deltas.sum(axis=0))
    balance = intra * inter
    threshold = np.sort(balance, axis=1)[:, int(d * (1 - ratio))][:, None]
    scales = ref_minmax(np.maximum(balance, threshold))
    numerator = (np.sign(deltas) * clipped * scales * weights[:, None]).sum(axis=0)
    merged = numerator / np.maximum(scales.sum(axis=0), 1e-12)
    return base + scale * merged.reshape(base.shape)


def random_inputs(seed: int, shape: tuple[int, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    tuned = base + rng.normal(scale=0.3, size=(k, *shape))
    return base, tuned


@pytest.mark.parametrize(
    ("shape", "k", "ratio", "clamp_ratio"),
    [
        ((16, 24), 2, 0.1, 0.0001),
        ((16, 24), 3, 0.2, 0.01),
        ((300,), 4, 0.05, 0.01),
        ((4, 5, 6), 3, 1.0, 0.0),
        ((50, 40), 5, 0.5, 0.05),
    ],
)
def test_pcb_matches_float64_reference(
    shape: tuple[int, ...], k: int, ratio: float, clamp_ratio: float
) -> None:
    base, tuned = random_inputs(k, shape, k)
    weights = np.linspace(0.8, 1.3, k)
    out = pcb(
        torch.from_numpy(base),
        torch.from_numpy(tuned),
        torch.from_numpy(weights),
        ratio=ratio,
        clamp_ratio=clamp_ratio,
        scale=0.7,
    )
    expected = ref_pcb(base, tuned, weights, ratio, clamp_ratio, 0.7)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 5),
    d=st.integers(2, 200),
    ratio=st.floats(0.05, 1.0),
    clamp_ratio=st.sampled_from([0.0, 0.0001, 0.01, 0.1]),
)
def test_pcb_matches_reference_on_varied_inputs(
    seed: int, k: int, d: int, ratio: float, clamp_ratio: float
) -> None:
    base, tuned = random_inputs(seed, (d,), k)
    weights = np.ones(k)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = ref_pcb(base, tuned, weights, ratio, clamp_ratio, 1.0)
    # the reference divides by zero where a row's top score equals its threshold (all the
    # kept scores equal); test_pcb_degenerate_rows_are_finite covers the kernel's choice there
    assume(bool(np.isfinite(expected).all()))
    out = pcb(
        torch.from_numpy(base),
        torch.from_numpy(tuned),
        torch.from_numpy(weights),
        ratio=ratio,
        clamp_ratio=clamp_ratio,
    )
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_pcb_golden_case() -> None:
    """Worked by hand: k = 2, d = 4, r = 0.75, no clipping.

    Σ τ = [0.6, 0, 0.4, 0]; task 1's scores are exp(2(m² − 1))·tanh(τ·Στ) with
    m = [1, 0, 1/3, 2/3]: [tanh 0.24, 0, e^(−16/9)·tanh 0.08, 0]; the threshold (sorted
    index 1) is 0, so its scales are [1, 0, 0.0569, 0]. Task 2 has m = [0.5, 0, 0.5, 1]
    and scores [e^(−1.5)·tanh 0.12, 0, e^(−1.5)·tanh 0.08, 0]: scales [1, 0, 0.668, 0].
    """
    base = torch.zeros(4, dtype=torch.float64)
    tuned = torch.tensor([[0.4, -0.1, 0.2, 0.3], [0.2, 0.1, 0.2, -0.3]], dtype=torch.float64)
    clipped, scales = pcb_scores(tuned - base, 0.75, 0.0)
    task1 = np.exp(-16 / 9) * np.tanh(0.08) / np.tanh(0.24)
    task2 = np.tanh(0.08) / np.tanh(0.12)  # entries 0 and 2 share m = 0.5
    np.testing.assert_allclose(scales.numpy(), [[1, 0, task1, 0], [1, 0, task2, 0]], atol=1e-15)
    assert torch.equal(clipped, tuned)
    out = pcb(base, tuned, torch.ones(2, dtype=torch.float64), ratio=0.75, clamp_ratio=0.0)
    np.testing.assert_allclose(out.numpy(), [0.3, 0.0, 0.2, 0.0], atol=1e-15)
    # per-task coefficients multiply the clipped task vectors, not the scales
    two_zero = torch.tensor([2.0, 0.0], dtype=torch.float64)
    weighted = pcb(base, tuned, two_zero, ratio=0.75, clamp_ratio=0.0)
    np.testing.assert_allclose(weighted.numpy()[0], 0.4, atol=1e-15)
    # the released upper clip index ⌊d(1 − c)⌋ − 1 is d − 2 whenever d·c < 1: at the default
    # c on four entries, task 1's 0.4 is clipped to its second largest magnitude, 0.3
    clipped_default = pcb(base, tuned, two_zero, ratio=0.75)
    np.testing.assert_allclose(clipped_default.numpy()[0], 0.3, atol=1e-15)


def test_pcb_clips_outliers_before_merging() -> None:
    """With c = 0.1 on 10 entries the largest magnitude is clipped to the 9th smallest."""
    base = torch.zeros(10, dtype=torch.float64)
    row = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 50.0], dtype=torch.float64)
    clipped, _ = pcb_scores((row - base)[None], 1.0, 0.1)
    assert clipped[0, -1].item() == 0.9
    assert clipped[0, 0].item() == 0.2  # the smallest is raised to the 2nd smallest


def test_pcb_degenerate_rows_are_finite() -> None:
    """A zero task vector, a one-entry tensor and all-equal scores give finite results."""
    base = torch.zeros(6)
    zero_and_live = torch.stack([torch.zeros(6), torch.linspace(-1, 1, 6)])
    out = pcb(base, zero_and_live, torch.ones(2), ratio=0.5)
    assert torch.isfinite(out).all()
    one = pcb(torch.zeros(1), torch.tensor([[0.5], [0.3]]), torch.ones(2))
    assert torch.isfinite(one).all()
    np.testing.assert_allclose(one.numpy(), [0.4], rtol=1e-6)  # both kept at full weight
    equal = pcb(torch.zeros(5), torch.full((2, 5), 0.2), torch.ones(2), ratio=0.4)
    np.testing.assert_allclose(equal.numpy(), np.full(5, 0.2), rtol=1e-6)


def test_pcb_many_tasks_in_float32_do_not_overflow() -> None:
    """exp(k·m²) overflows float32 for k ≥ 89; the kernel shifts it, the scales are unchanged."""
    base, tuned = random_inputs(5, (64,), 120)
    weights = np.ones(120)
    out = pcb(
        torch.from_numpy(base).float(),
        torch.from_numpy(tuned).float(),
        torch.from_numpy(weights).float(),
        ratio=0.3,
        clamp_ratio=0.01,
    )
    assert torch.isfinite(out).all()
    expected64 = pcb(
        torch.from_numpy(base),
        torch.from_numpy(tuned),
        torch.from_numpy(weights),
        ratio=0.3,
        clamp_ratio=0.01,
    )
    np.testing.assert_allclose(out.double().numpy(), expected64.numpy(), rtol=1e-4, atol=1e-5)


def test_pcb_registry_row_and_adapter() -> None:
    row = METHODS["pcb"]
    defaults = {p.name: p.default for p in row.params}
    assert defaults == {"weight": 1.0, "pcb_ratio": 0.1, "clamp_ratio": 0.0001, "lambda": 1.0}
    assert row.base == "required"
    base, tuned = random_inputs(3, (8, 12), 3)
    inputs = MethodInputs(
        torch.from_numpy(tuned),
        torch.from_numpy(base),
        {"weight": torch.tensor([1.0, 0.5, 1.2], dtype=torch.float64)},
        {"pcb_ratio": 0.2, "clamp_ratio": 0.01, "lambda": 0.9},
        torch.Generator().manual_seed(0),
    )
    expected = ref_pcb(base, tuned, np.array([1.0, 0.5, 1.2]), 0.2, 0.01, 0.9)
    np.testing.assert_allclose(run_pcb(inputs).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_pcb_merges_a_model_from_yaml(family: dict[str, Path]) -> None:
    """End to end: every output tensor equals the reference on that tensor's inputs."""
    config = {
        "merge_method": "pcb",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.1}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.9}},
        ],
        "parameters": {"pcb_ratio": 0.2, "clamp_ratio": 0.01},
        "dtype": "float64",
    }
    state = merge_to_state_dict(config)
    inputs = {name: load_file(str(family[name] / "model.safetensors")) for name in family}
    for tensor_name, out in state.items():
        base = inputs["base"][tensor_name].double().numpy()
        tuned = np.stack([inputs[m][tensor_name].double().numpy() for m in ("ft1", "ft2")])
        expected = ref_pcb(base, tuned, np.array([1.1, 0.9]), 0.2, 0.01, 1.0)
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-7)
