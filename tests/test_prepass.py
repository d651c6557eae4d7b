"""Model-wide top-k (``density_scope: model``): exactly k entries over the whole model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit import merge_to_state_dict, plan_merge
from alloykit.errors import ConfigError
from alloykit.methods.task_vectors import sparsify
from alloykit.plan import COPY, TensorInput, TensorJob
from alloykit.prepass import with_model_thresholds
from tests.helpers import load_tensors


def prune_recipe(family: dict[str, Path], density: object, **params: object) -> dict:
    return {
        "merge_method": "magnitude_prune",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": density}}
        ],
        "parameters": {"density_scope": "model", **params},
    }


def reference_global_topk(family: dict[str, Path], config: dict, density: float) -> dict:
    """base + δ·[δ among the model's k largest |δ|], ties to the earlier tensor, then index."""
    base, tuned = load_tensors(family["base"]), load_tensors(family["ft1"])
    names = [j.output for j in plan_merge(config).jobs if j.method != COPY]
    deltas = [(tuned[n] - base[n]).astype(np.float32) for n in names]
    flat = np.concatenate([d.reshape(-1) for d in deltas])
    k = max(1, int(density * flat.size))
    # stable order: larger |δ| first, then lower position in the concatenation
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for name, delta in zip(names, deltas, strict=True):
        mask = keep[start : start + delta.size].reshape(delta.shape)
        out[name] = base[name] + np.where(mask, delta, 0)
        start += delta.size
    return out


@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_model_wide_topk_equals_the_reference(family: dict[str, Path], density: float) -> None:
    config = prune_recipe(family, density)
    ours = merge_to_state_dict(config)
    expected = reference_global_topk(family, config, density)
    for name, values in expected.items():
        np.testing.assert_array_equal(ours[name].double().numpy(), values.astype(np.float32))
    per_tensor = merge_to_state_dict({**config, "parameters": {}})
    assert any(not torch.equal(ours[n], per_tensor[n]) for n in expected)


def test_ties_in_magnitude_keep_exactly_k(sharded_family: dict[str, Path]) -> None:
    # bfloat16 models: many task-vector entries have exactly the same magnitude
    config = prune_recipe(sharded_family, 0.3)
    ours = merge_to_state_dict(config)
    base, tuned = load_tensors(sharded_family["base"]), load_tensors(sharded_family["ft1"])
    names = [j.output for j in plan_merge(config).jobs if j.method != COPY]
    magnitudes = np.abs(np.concatenate([(tuned[n] - base[n]).reshape(-1) for n in names]))
    k = int(0.3 * magnitudes.size)
    threshold = np.partition(magnitudes, magnitudes.size - k)[magnitudes.size - k]
    # the cut falls inside a run of equal magnitudes: some of them kept, some dropped
    assert np.sum(magnitudes > threshold) < k < np.sum(magnitudes >= threshold)
    expected = reference_global_topk(sharded_family, config, 0.3)
    for name, values in expected.items():
        np.testing.assert_array_equal(ours[name].double().numpy(), values)


def test_ties_with_model_scope_and_one_density_per_model(family: dict[str, Path]) -> None:
    config = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": 0.2}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.5, "density": 0.4}},
        ],
        "parameters": {"density_scope": "model"},
    }
    merged = merge_to_state_dict(config)
    assert merged.keys() == merge_to_state_dict({**config, "parameters": {}}).keys()
    varying = {
        **config,
        "models": [
            {
                "model": str(family["ft1"]),
                "parameters": {
                    "weight": 1.0,
                    "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}],
                },
            },
            config["models"][1],
        ],
    }
    with pytest.raises(ConfigError, match="density_scope: model needs one density per model"):
        merge_to_state_dict(varying)


def test_hand_worked_thresholds_and_tie_quotas() -> None:
    # One model, two tensors: δ = [3, −1, 2] then [2, 0.5]; density 0.4 of N = 5 keeps k = 2.
    # The two largest |δ| are 3 and one of the two 2s: the tie goes to the earlier tensor, so
    # the threshold is 2, the first tensor keeps its one entry equal to 2 and the second none.
    deltas = {"a": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([2.0, 0.5])}

    def job(name: str) -> TensorJob:
        size = deltas[name].numel()
        return TensorJob(
            name,
            (size,),
            "F32",
            "magnitude_prune",
            (TensorInput("ft", name),),
            TensorInput("base", name),
            {"weight": (1.0,), "density": (0.4,)},
            {"density_scope": "model", "delta_norm": "none"},
            4 * size,
        )

    def load(j: TensorJob) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = torch.ones_like(deltas[j.output])
        return (base + deltas[j.output]).unsqueeze(0), base

    first, second = with_model_thresholds([job("a"), job("b")], load)
    assert first.per_model["threshold"] == (2.0,) and first.per_model["tie_quota"] == (1.0,)
    assert second.per_model["threshold"] == (2.0,) and second.per_model["tie_quota"] == (0.0,)
    kept = [
        sparsify(deltas[j.output], "magnitude", density=0.4, model_threshold=(2.0, int(q)))
        for j, q in ((first, 1), (second, 0))
    ]
    assert kept[0].tolist() == [3.0, 0.0, 2.0] and kept[1].tolist() == [0.0, 0.0]
