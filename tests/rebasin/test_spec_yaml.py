"""Permutation specs declared in YAML: a residual network inference cannot handle, and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from alloykit.errors import ConfigError
from alloykit.rebasin import SpecError, apply_permutations, load_spec, weight_matching
from tests.rebasin.nets import assert_states_equal, random_permutations, state

RESIDUAL_SPEC = """\
# the residual stream 'res' is one permutation shared by every block's input and output
tensors:
  inp.weight: [res, null]
  inp.bias: [res]
  blocks.0.fc1.weight: [hid0, res]
  blocks.0.fc1.bias: [hid0]
  blocks.0.fc2.weight: [res, hid0]
  blocks.0.fc2.bias: [res]
  blocks.1.fc1.weight: [hid1, res]
  blocks.1.fc1.bias: [hid1]
  blocks.1.fc2.weight: [res, hid1]
  blocks.1.fc2.bias: [res]
  norm.weight: [res]
  norm.bias: [res]
  out.weight: [null, res]
"""


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.2)
            self.norm.bias.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


def shapes(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def test_residual_spec_recovers_and_preserves_function(tmp_path: Path) -> None:
    net = ResidualMLP(0)
    weights = state(net)
    path = tmp_path / "spec.yml"
    path.write_text(RESIDUAL_SPEC)
    spec = load_spec(path, shapes(weights), "res")
    assert spec.sizes == {"res": 16, "hid0": 24, "hid1": 24}
    scrambled = apply_permutations(spec, random_permutations(spec, 2), weights)
    permuted = copy.deepcopy(net)
    permuted.load_state_dict(scrambled)
    x = torch.randn(5, 8)
    torch.testing.assert_close(permuted(x), net(x), rtol=1e-5, atol=1e-5)
    found = weight_matching(spec, weights, scrambled, seed=3)
    assert_states_equal(apply_permutations(spec, found.perms, scrambled), weights)


def test_declared_sizes_and_outer_blocks(tmp_path: Path) -> None:
    path = tmp_path / "heads.yml"
    path.write_text(
        "permutations: {heads: 4}\n"
        "tensors:\n  qkv.weight: [{perm: heads, outer: 3}, null]\n  proj.weight: [null, heads]\n"
    )
    spec = load_spec(path, {"qkv.weight": (24, 8), "proj.weight": (8, 8)}, "m")
    assert spec.sizes == {"heads": 4}
    assert spec.axes["qkv.weight"][0] is not None and spec.axes["qkv.weight"][0].outer == 3


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("tensors:\n  missing.weight: [a, null]\n", SpecError, "'missing.weight' is not in"),
        ("tensors:\n  fc.weight: [a]\n", SpecError, "gives 1 axes for tensor 'fc.weight'"),
        ("permutations: {a: 5}\ntensors:\n  fc.weight: [a, null]\n", SpecError, "not a multiple"),
        ("tensors:\n  fc.weight: [3, null]\n", ConfigError, "tensors.fc.weight[0]"),
        ("tensors:\n  fc.weight: [{perm: a, outer: 0}, null]\n", ConfigError, "positive"),
        ("fc.weight: [a, null]\n", ConfigError, "needs a 'tensors:' mapping"),
        ("tensors: [\n", ConfigError, "cannot read"),
    ],
)
def test_bad_specs_name_the_problem(tmp_path: Path, text: str, error: type, message: str) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(error) as caught:
        load_spec(path, {"fc.weight": (8, 4), "fc.bias": (8,)}, "m")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_printed_spec_reads_back_as_the_same_spec(tmp_path: Path) -> None:
    from alloykit.rebasin import infer_spec
    from alloykit.rebasin.spec import spec_to_yaml

    # GPT-2-like names: fused q|k|v (outer 3), heads from the config, Conv1D (in, out) weights
    shapes = {
        "h.0.attn.c_attn.weight": (16, 48),
        "h.0.attn.c_attn.bias": (48,),
        "h.0.attn.c_proj.weight": (16, 16),
        "h.0.mlp.c_fc.weight": (16, 64),
        "h.0.mlp.c_fc.bias": (64,),
        "h.0.mlp.c_proj.weight": (64, 16),
    }
    spec = infer_spec(shapes, {"n_head": 4}, "gpt2")
    path = tmp_path / "spec.yml"
    path.write_text(spec_to_yaml(spec))
    again = load_spec(path, shapes, "gpt2")
    assert again.sizes == spec.sizes == {"h.0.mlp": 64, "h.0.heads": 4}
    assert again.axes == spec.axes


RESNET_SPEC = """\
tensors:
  stem.weight: [res, null, null, null]
  stem_bn.weight: [res]
  stem_bn.bias: [res]
  stem_bn.running_mean: [res]
  stem_bn.running_var: [res]
  block.conv1.weight: [mid, res, null, null]
  block.bn1.weight: [mid]
  block.bn1.bias: [mid]
  block.bn1.running_mean: [mid]
  block.bn1.running_var: [mid]
  block.conv2.weight: [res, mid, null, null]
  block.bn2.weight: [res]
  block.bn2.bias: [res]
  block.bn2.running_mean: [res]
  block.bn2.running_var: [res]
  head.weight: [null, res]
"""


class TinyResNet(nn.Module):
    """A stem and one residual block with BatchNorm: the residual stream is one group."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block = nn.Module()
        self.block.conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.block.bn1 = nn.BatchNorm2d(12)
        self.block.conv2 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.block.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        h = torch.relu(self.block.bn1(self.block.conv1(x)))
        x = torch.relu(x + self.block.bn2(self.block.conv2(h)))
        return self.head(x.mean((2, 3)))


def test_resnet_block_spec_with_batchnorm(tmp_path: Path) -> None:
    from tests.rebasin.nets import randomise_batchnorm

    net = TinyResNet().eval()
    randomise_batchnorm(net, 1)
    weights = state(net)
    path = tmp_path / "resnet.yml"
    path.write_text(RESNET_SPEC)
    spec = load_spec(path, shapes(weights), "resnet")
    scrambled = apply_permutations(spec, random_permutations(spec, 6), weights)
    permuted = copy.deepcopy(net)
    permuted.load_state_dict(scrambled)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(permuted(x), net(x), rtol=1e-5, atol=1e-5)
    found = weight_matching(spec, weights, scrambled)
    assert_states_equal(apply_permutations(spec, found.perms, scrambled), weights)
