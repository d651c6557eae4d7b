"""Weight matching: exact recovery of a known permutation, and function preservation."""

from __future__ import annotations

import copy

import pytest
import torch

from alloykit.rebasin import (
    AxisPermutation,
    PermutationSpec,
    apply_permutations,
    infer_spec,
    weight_matching,
)
from tests.rebasin.nets import (
    ConvBN,
    assert_states_equal,
    mlp,
    random_permutations,
    randomise_batchnorm,
    state,
)


def shapes(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def test_mlp_spec_chains_hidden_layers() -> None:
    spec = infer_spec(shapes(state(mlp(0))), None, "mlp")
    assert spec.sizes == {"0": 32, "2": 24, "4": 16}
    assert spec.axes["0.weight"] == (AxisPermutation("0"), None)
    assert spec.axes["2.weight"] == (AxisPermutation("2"), AxisPermutation("0"))
    assert spec.axes["6.weight"] == (None, AxisPermutation("4"))
    assert "6.bias" not in spec.axes  # the output layer's units are the classes: never permuted


def test_permuting_preserves_the_function() -> None:
    net = mlp(0)
    weights = state(net)
    spec = infer_spec(shapes(weights), None, "mlp")
    permuted = copy.deepcopy(net)
    permuted.load_state_dict(apply_permutations(spec, random_permutations(spec, 1), weights))
    x = torch.randn(20, 12)
    assert not torch.equal(state(permuted)["0.weight"], weights["0.weight"])
    torch.testing.assert_close(permuted(x), net(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_recovers_a_random_permutation_exactly(seed: int) -> None:
    weights = state(mlp(seed))
    spec = infer_spec(shapes(weights), None, "mlp")
    scrambled = apply_permutations(spec, random_permutations(spec, seed + 10), weights)
    found = weight_matching(spec, weights, scrambled, seed=seed)
    assert found.converged
    assert_states_equal(apply_permutations(spec, found.perms, scrambled), weights)


def test_aligning_independent_models_preserves_function_and_brings_them_closer() -> None:
    a, b = mlp(0), mlp(1)
    spec = infer_spec(shapes(state(a)), None, "mlp")
    found = weight_matching(spec, state(a), state(b))
    aligned = copy.deepcopy(b)
    aligned.load_state_dict(apply_permutations(spec, found.perms, state(b)))
    x = torch.randn(16, 12)
    torch.testing.assert_close(aligned(x), b(x), rtol=1e-6, atol=1e-6)

    def distance(m: torch.nn.Module) -> float:
        return sum(
            float((p - q).detach().pow(2).sum())
            for p, q in zip(a.parameters(), m.parameters(), strict=True)
        )

    assert distance(aligned) < distance(b)


def test_same_seed_same_result_and_identity_for_identical_models() -> None:
    a, b = state(mlp(0)), state(mlp(1))
    spec = infer_spec(shapes(a), None, "mlp")
    first = weight_matching(spec, a, b, seed=5)
    again = weight_matching(spec, a, b, seed=5)
    assert all(torch.equal(first.perms[p], again.perms[p]) for p in spec.sizes)
    same = weight_matching(spec, a, a)
    assert all(torch.equal(same.perms[p], torch.arange(n)) for p, n in spec.sizes.items())
    assert same.rounds == 1


def test_cnn_with_batchnorm_by_name_recovers_and_preserves_function() -> None:
    net = ConvBN("batch").eval()
    randomise_batchnorm(net, 0)
    weights = state(net)
    spec = infer_spec(shapes(weights), None, "cnn")
    # bn1 belongs to conv1 (its trailing number), whatever their order; fc takes 6 x 16 inputs
    assert spec.axes["bn1.running_var"] == (AxisPermutation("conv1"),)
    assert spec.axes["bn2.weight"] == (AxisPermutation("conv2"),)
    assert spec.axes["fc.weight"] == (None, AxisPermutation("conv2"))
    assert "bn1.num_batches_tracked" not in spec.axes
    scrambled = apply_permutations(spec, random_permutations(spec, 3), weights)
    permuted = copy.deepcopy(net)
    permuted.load_state_dict(scrambled)
    x = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(permuted(x), net(x), rtol=1e-5, atol=1e-5)
    found = weight_matching(spec, weights, scrambled)
    assert_states_equal(apply_permutations(spec, found.perms, scrambled), weights)


def test_sequential_cnn_with_groupnorm_and_flatten() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.GroupNorm(8, 8),  # one channel per group: permutation-equivariant
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 5, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 2 * 2, 7),
        torch.nn.ReLU(),
        torch.nn.Linear(7, 3),
    )
    weights = state(net)
    spec = infer_spec(shapes(weights), None, "seq")
    assert spec.axes["1.weight"] == (AxisPermutation("0"),)
    scrambled = apply_permutations(spec, random_permutations(spec, 4), weights)
    permuted = copy.deepcopy(net)
    permuted.load_state_dict(scrambled)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(permuted(x), net(x), rtol=1e-5, atol=1e-5)
    found = weight_matching(spec, weights, scrambled)
    assert_states_equal(apply_permutations(spec, found.perms, scrambled), weights)


def test_blocks_of_units_permute_whole_blocks() -> None:
    # 3 units of 2 entries each on axis 0, the q|k|v style outer factor on axis 1
    spec = PermutationSpec(
        {"u": 3},
        {"w": (AxisPermutation("u"), None), "v": (None, AxisPermutation("u", outer=2))},
    )
    w = torch.arange(6.0).reshape(6, 1)
    v = torch.arange(12.0).reshape(1, 12)
    out = apply_permutations(spec, {"u": torch.tensor([2, 0, 1])}, {"w": w, "v": v})
    assert out["w"].flatten().tolist() == [4, 5, 0, 1, 2, 3]
    assert out["v"].flatten().tolist() == [4, 5, 0, 1, 2, 3, 10, 11, 6, 7, 8, 9]
