"""MergeMany (Git Re-Basin, Appendix Algorithm 3): N models aligned to their evolving mean."""

from __future__ import annotations

import copy

import torch

from alloykit.rebasin import apply_permutations, infer_spec, merge_many
from tests.rebasin.nets import assert_states_equal, mlp, random_permutations, state


def test_permuted_copies_are_brought_back_to_one_order() -> None:
    net = mlp(0)
    weights = state(net)
    spec = infer_spec({k: tuple(v.shape) for k, v in weights.items()}, None, "mlp")
    copies = [apply_permutations(spec, random_permutations(spec, s), weights) for s in (1, 2, 3)]
    found = merge_many(spec, copies, seed=0)
    assert found.converged
    for aligned in found.aligned[1:]:
        assert_states_equal(aligned, found.aligned[0])
    for original, perms, aligned in zip(copies, found.perms, found.aligned, strict=True):
        assert_states_equal(apply_permutations(spec, perms, original), aligned)
    merged = copy.deepcopy(net)
    merged.load_state_dict(found.mean())
    x = torch.randn(10, 12)
    torch.testing.assert_close(merged(x), net(x), rtol=1e-5, atol=1e-5)  # the mean is the model


def test_independent_models_get_closer_and_seeds_reproduce() -> None:
    models = [state(mlp(s)) for s in (0, 1, 2)]
    spec = infer_spec({k: tuple(v.shape) for k, v in models[0].items()}, None, "mlp")

    def spread(states: list[dict[str, torch.Tensor]]) -> float:
        return sum(
            float((a[n] - b[n]).pow(2).sum())
            for i, a in enumerate(states)
            for b in states[i + 1 :]
            for n in spec.axes
        )

    found = merge_many(spec, models, seed=4)
    again = merge_many(spec, models, seed=4)
    assert spread(found.aligned) < 0.9 * spread(models)
    for a, b in zip(found.aligned, again.aligned, strict=True):
        assert_states_equal(a, b)
    for model, aligned in zip(models, found.aligned, strict=True):
        x = torch.randn(6, 12)
        one, other = mlp(0), mlp(0)
        one.load_state_dict(model)
        other.load_state_dict(aligned)
        torch.testing.assert_close(one(x), other(x), rtol=1e-5, atol=1e-5)
