"""Tiny networks and permutation helpers shared by the Re-Basin tests."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from alloykit.rebasin.spec import Permutations, PermutationSpec


def mlp(seed: int, widths: tuple[int, ...] = (12, 32, 24, 16, 5)) -> nn.Sequential:
    """Linear/ReLU layers ``widths[0] -> ... -> widths[-1]``, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvBN(nn.Module):
    """conv1/bn1, conv2/bn2 (``bnN`` follows ``convN`` by name), flatten, fc: a plain CNN."""

    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(8, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6) if norm == "batch" else nn.GroupNorm(6, 6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def randomise_batchnorm(module: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator))
                m.running_mean.copy_(torch.randn(n, generator=generator))
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def random_permutations(spec: PermutationSpec, seed: int) -> Permutations:
    """A random permutation of every group (none of them the identity)."""
    generator = torch.Generator().manual_seed(seed)
    perms = {}
    for perm, size in sorted(spec.sizes.items()):
        index = torch.randperm(size, generator=generator)
        while size > 1 and torch.equal(index, torch.arange(size)):
            index = torch.randperm(size, generator=generator)
        perms[perm] = index
    return perms


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
