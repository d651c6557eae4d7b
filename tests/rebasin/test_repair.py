"""BatchNorm reset and REPAIR (Jordan et al. 2023) of a merged network."""

from __future__ import annotations

import copy

import torch

from alloykit.rebasin import (
    apply_permutations,
    infer_spec,
    repair,
    reset_batchnorm,
    weight_matching,
)
from alloykit.rebasin.matching import mean_state
from alloykit.rebasin.repair import batches
from tests.rebasin.nets import ConvBN, mlp, randomise_batchnorm, state


def test_batchnorm_reset_computes_the_exact_statistics() -> None:
    net = ConvBN("batch")
    randomise_batchnorm(net, 0)
    net.bn1.momentum = 0.3
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert reset_batchnorm(net, batches(x, 16)) == 2  # three uneven batches: 16, 16, 8
    with torch.no_grad():
        conv1 = net.conv1(x)
    # the plain average of the batches' statistics (BatchNorm keeps unbiased variances)
    parts = torch.split(conv1, 16)
    mean = torch.stack([c.mean((0, 2, 3)) for c in parts]).mean(0)
    variance = torch.stack([c.var((0, 2, 3), unbiased=True) for c in parts]).mean(0)
    torch.testing.assert_close(net.bn1.running_mean, mean)
    torch.testing.assert_close(net.bn1.running_var, variance)
    assert net.bn1.momentum == 0.3 and net.training


def unit_stats(net: torch.nn.Sequential, x: torch.Tensor, upto: int) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        h = net[: upto + 1](x).to(torch.float64)
    return h.mean(0), h.std(0, unbiased=False)


def test_repair_gives_each_unit_the_interpolated_statistics() -> None:
    a, b = mlp(0), mlp(1)
    spec = infer_spec({k: tuple(v.shape) for k, v in state(a).items()}, None, "mlp")
    perms = weight_matching(spec, state(a), state(b)).perms
    b.load_state_dict(apply_permutations(spec, perms, state(b)))
    merged = copy.deepcopy(a)
    merged.load_state_dict({k: v.float() for k, v in mean_state([state(a), state(b)]).items()})
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(1))
    data = batches(x, 128)
    before = unit_stats(merged, x, 2)
    assert repair(merged, [a, b], [0.5, 0.5], data) == 3  # three hidden layers, not the output
    for index in (0, 2, 4):  # the Linear layers' outputs, before each ReLU
        mean_a, std_a = unit_stats(a, x, index)
        mean_b, std_b = unit_stats(b, x, index)
        mean, std = unit_stats(merged, x, index)
        torch.testing.assert_close(mean, (mean_a + mean_b) / 2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, (std_a + std_b) / 2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before[1], unit_stats(merged, x, 2)[1])
