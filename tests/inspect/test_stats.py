"""Task-vector statistics on constructed models with known answers, and against NumPy float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit.inspect.collect import inspect_config, inspect_models
from alloykit.inspect.stats import TOP_SHARES, shares_base, tensor_sums
from tests.inspect.models import RELATIVE, SMALL, tensors_of

LAYERS = 3


def test_known_answers(constructed: dict[str, Path]) -> None:
    names = ["ft", "same", "negated", "zero", "foreign"]
    inspection = inspect_models(str(constructed["base"]), [str(constructed[n]) for n in names])
    total = inspection.total()
    cosine, conflict = total.cosine(), total.conflict()
    ft, same, negated, zero, foreign = range(5)
    # identical task vectors: cosine 1, no conflict; negated: cosine -1, every sign conflicts
    assert cosine[ft, same] == pytest.approx(1, abs=1e-12)
    assert conflict[ft, same] == 0
    assert cosine[ft, negated] == pytest.approx(-1, abs=1e-12)
    assert conflict[ft, negated] == 1
    for layer in inspection.layers:
        assert inspection.layer(layer).conflict()[ft, negated] == 1
    # a zero task vector has no direction and no top entries
    assert np.isnan(cosine[ft, zero]) and np.isnan(conflict[ft, zero])
    # every tensor of ft was built with ‖δ‖ = 0.1·‖base‖
    assert inspection.matrices.relative_norm()[ft] == pytest.approx(RELATIVE, rel=1e-6)
    assert total.relative_norm()[ft] == pytest.approx(RELATIVE, rel=1e-6)
    relative, base_cosine = inspection.matrices.relative_norm(), inspection.matrices.base_cosine()
    assert shares_base(relative[ft], base_cosine[ft])
    assert not shares_base(relative[foreign], base_cosine[foreign])  # another random base
    assert relative[foreign] > 1.3 and abs(base_cosine[foreign]) < 0.05


def test_shares_base_thresholds() -> None:
    assert shares_base(0.1, 0.995)
    assert shares_base(0.5, 0.5)
    assert not shares_base(0.51, 0.9)
    assert not shares_base(0.2, 0.49)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def top_sq(delta: np.ndarray, share: float) -> tuple[float, np.ndarray]:
    """Reference top-k: the k largest magnitudes (no ties in random data), k = max(1, int(s·n))."""
    n = delta.size
    k = min(n, max(1, int(share * n)))
    order = np.argsort(-np.abs(delta), kind="stable")[:k]
    mask = np.zeros(n, dtype=bool)
    mask[order] = True
    return float(np.sum(delta[mask] ** 2)), mask


def reference_by_layer(models: list[str]) -> dict[int, dict[str, np.ndarray]]:
    """Per-layer figures from the constructed tensors, in float64 NumPy."""
    data = tensors_of()
    base = {n: v.astype(np.float64).ravel() for n, v in data["base"].items()}
    deltas = {m: {n: data[m][n].astype(np.float64).ravel() - base[n] for n in base} for m in models}
    k = len(models)
    figures = {}
    for layer in range(LAYERS):
        names = [n for n in base if layer_of(n) == layer]
        base_sq = sum(float(base[n] @ base[n]) for n in names)
        dot = np.array(
            [
                [sum(float(deltas[a][n] @ deltas[b][n]) for n in names) for b in models]
                for a in models
            ]
        )
        top = np.zeros((k, len(TOP_SHARES)))
        both = np.zeros((k, k))
        disagree = np.zeros((k, k))
        for n in names:
            masks = []
            for i, m in enumerate(models):
                for c, share in enumerate(TOP_SHARES):
                    value, mask = top_sq(deltas[m][n], share)
                    top[i, c] += value
                    if share == 0.20:
                        masks.append(mask)
            for i in range(k):
                for j in range(k):
                    together = masks[i] & masks[j]
                    both[i, j] += together.sum()
                    signs = np.sign(deltas[models[i]][n]) * np.sign(deltas[models[j]][n])
                    disagree[i, j] += (together & (signs < 0)).sum()
        norms = np.sqrt(np.diag(dot))
        figures[layer] = {
            "relative": norms / np.sqrt(base_sq),
            "cosine": dot / np.outer(norms, norms),
            "conflict": disagree / both,
            "top_share": top / np.diag(dot)[:, None],
        }
    return figures


def test_per_layer_figures_equal_numpy(constructed: dict[str, Path]) -> None:
    models = ["ft", "small", "foreign"]
    inspection = inspect_models(str(constructed["base"]), [str(constructed[m]) for m in models])
    reference = reference_by_layer(models)
    assert inspection.layers == list(range(LAYERS))
    for layer in inspection.layers:
        sums, expected = inspection.layer(layer), reference[layer]
        np.testing.assert_allclose(sums.relative_norm(), expected["relative"], rtol=1e-10)
        np.testing.assert_allclose(sums.cosine(), expected["cosine"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sums.conflict(), expected["conflict"], rtol=0, atol=0)
        np.testing.assert_allclose(sums.top_share(), expected["top_share"], rtol=1e-10)
    small = inspection.matrices.relative_norm()[1]
    assert small == pytest.approx(SMALL, rel=1e-6)


def ties_reference(
    deltas: list[np.ndarray], weights: list[float], density: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TIES (Yadav et al. 2023) in NumPy: trim to the top density, elect the sign of the
    weighted sum, disjoint weighted mean. Returns (survived masks, merged δ, reference δ)."""
    n = deltas[0].size
    kept = []
    for delta in deltas:
        order = np.argsort(-np.abs(delta), kind="stable")[: max(1, int(density * n))]
        mask = np.zeros(n, dtype=bool)
        mask[order] = True
        kept.append(np.where(mask, delta, 0.0))
    weighted = np.stack([w * t for w, t in zip(weights, kept, strict=True)])
    elected = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(weighted) == elected
    divisor = (agree * np.array(weights)[:, None]).sum(axis=0)
    merged = (weighted * agree).sum(axis=0) / np.where(divisor == 0, 1.0, divisor)
    reference = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    return agree & (np.stack(kept) != 0), merged, reference


def test_recipe_retained_and_interference_equal_numpy(constructed: dict[str, Path]) -> None:
    models, weights, density = ["ft", "small", "negated"], [1.0, 2.0, 0.5], 0.4
    config = {
        "merge_method": "ties",
        "base_model": str(constructed["base"]),
        "models": [
            {"model": str(constructed[m]), "parameters": {"weight": w, "density": density}}
            for m, w in zip(models, weights, strict=True)
        ],
    }
    inspection = inspect_config(config, precision="float64")
    assert inspection.method == "ties"
    data = tensors_of()
    for layer in inspection.layers:
        retained_sq, delta_sq = np.zeros(3), np.zeros(3)
        difference_sq = reference_sq = 0.0
        for name in (n for n in data["base"] if layer_of(n) == layer):
            base = data["base"][name].astype(np.float64).ravel()
            deltas = [data[m][name].astype(np.float64).ravel() - base for m in models]
            survived, merged, reference = ties_reference(deltas, weights, density)
            for i, delta in enumerate(deltas):
                retained_sq[i] += np.sum(delta[survived[i]] ** 2)
                delta_sq[i] += np.sum(delta**2)
            difference_sq += np.sum((merged - reference) ** 2)
            reference_sq += np.sum(reference**2)
        sums = inspection.layer(layer)
        np.testing.assert_allclose(sums.retained(), retained_sq / delta_sq, rtol=1e-9)
        assert sums.interference() == pytest.approx(np.sqrt(difference_sq / reference_sq), rel=1e-9)
    assert inspection.total().retained()[2] < 0.2  # the negated, low-weight model is voted out


def test_random_methods_are_reproducible_and_keep_about_density(
    constructed: dict[str, Path],
) -> None:
    config = {
        "merge_method": "dare_linear",
        "base_model": str(constructed["base"]),
        "models": [
            {"model": str(constructed[m]), "parameters": {"weight": 0.5, "density": 0.3}}
            for m in ("ft", "small")
        ],
    }
    first = inspect_config(config, seed=3)
    again = inspect_config(config, seed=3).total()
    other = inspect_config(config, seed=4).total()
    np.testing.assert_array_equal(first.total().retained(), again.retained())
    assert first.total().interference() == again.interference()
    assert not np.array_equal(first.total().retained(), other.retained())
    # each entry survives with probability 0.3: over the ~20k matrix entries, about 30% of the
    # squared norm (norm gains are few entries with much of the mass, so they are left out)
    np.testing.assert_allclose(first.matrices.retained(), 0.3, atol=0.03)


def test_tensor_sums_leave_inputs_untouched() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, 30, generator=generator, dtype=torch.float64)
    tensors = base + 0.1 * torch.randn(2, 40, 30, generator=generator, dtype=torch.float64)
    before = tensors.clone()
    sums = tensor_sums(base, tensors)
    assert torch.equal(tensors, before)
    assert sums.numel == 1200 and sums.tensors == 1
