"""`alloykit align`: reference alignment, MergeMany, calibration, HF folders and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloykit.errors import AlloyError
from alloykit.rebasin import AlignOptions, align, align_many, apply_permutations, infer_spec
from tests.helpers import run_cli
from tests.rebasin.nets import mlp, random_permutations, state

NET_CODE = """\
import torch.nn as nn


def build():
    return nn.Sequential(
        nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
        nn.Linear(24, 5),
    )
"""


def bn_mlp(seed: int) -> torch.nn.Sequential:
    namespace: dict[str, object] = {}
    exec(NET_CODE, namespace)
    torch.manual_seed(seed)
    net = namespace["build"]()  # type: ignore[operator]
    assert isinstance(net, torch.nn.Sequential)
    with torch.no_grad():
        net[1].running_mean.normal_()
    return net


@pytest.fixture
def two_mlps(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(state(mlp(0)), a)
    torch.save(state(mlp(1)), b)
    return a, b


def test_align_reference_writes_the_permuted_model(
    tmp_path: Path, two_mlps: tuple[Path, Path]
) -> None:
    a, b = two_mlps
    result = run_cli("align", "--reference", a, b, tmp_path / "out", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "converged" in result.stdout and "weight distance" in result.stdout
    written = load_file(tmp_path / "out" / "model.safetensors")
    record = json.loads((tmp_path / "out" / "permutations.json").read_text())
    original = state(mlp(1))
    spec = infer_spec({k: tuple(v.shape) for k, v in original.items()}, None, "b")
    perms = {k: torch.tensor(v) for k, v in record["perms"].items()}
    expected = apply_permutations(spec, perms, original)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in written)
    net = mlp(0)
    net.load_state_dict(written)
    x = torch.randn(8, 12)
    torch.testing.assert_close(net(x), mlp(1)(x), rtol=1e-6, atol=1e-6)


def test_merge_many_with_batchnorm_reset_and_repair(tmp_path: Path) -> None:
    paths = []
    for seed in (0, 1, 2):
        paths.append(tmp_path / f"m{seed}.safetensors")
        from safetensors.torch import save_file

        save_file(state(bn_mlp(seed)), paths[-1])
    (tmp_path / "net.py").write_text(NET_CODE)
    torch.save(torch.randn(64, 12, generator=torch.Generator().manual_seed(0)), tmp_path / "x.pt")
    options = AlignOptions(
        calibration=tmp_path / "x.pt", module=f"{tmp_path / 'net.py'}:build", repair=True
    )
    result = align_many(paths, tmp_path / "out", options)  # the CLI's --merge-many, in process
    assert result.calibrated == ["REPAIR (2 layers)", "batchnorm reset (1 layers)"]
    assert result.models == 3 and result.distance_after < result.distance_before
    merged = load_file(tmp_path / "out" / "model.safetensors")
    record = json.loads((tmp_path / "out" / "permutations.json").read_text())
    assert len(record["perms"]) == 3
    net = bn_mlp(0)
    net.load_state_dict(merged)
    net.train()
    with torch.no_grad():
        hidden = net[0](torch.load(tmp_path / "x.pt"))
    # the BatchNorm statistics are those of the merged first layer on the calibration data
    torch.testing.assert_close(merged["1.running_mean"], hidden.mean(0), rtol=1e-4, atol=1e-5)


def test_hf_folder_scrambled_is_recovered_exactly(tmp_path: Path, family: dict[str, Path]) -> None:
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    original = load_file(family["ft1"] / "model.safetensors")
    config = json.loads((family["ft1"] / "config.json").read_text())
    spec = infer_spec({k: tuple(v.shape) for k, v in original.items()}, config, "ft1")
    scrambled = tmp_path / "scrambled"
    shutil.copytree(family["ft1"], scrambled)
    permuted = apply_permutations(spec, random_permutations(spec, 5), original)
    save_file(permuted, scrambled / "model.safetensors", metadata={"format": "pt"})

    result = align(family["ft1"], scrambled, tmp_path / "out", AlignOptions(seed=0))
    files = set(result.files)
    assert {"config.json", "model.safetensors", "permutations.json", "tokenizer.json"} <= files
    assert any(p.endswith("heads") for p in result.spec.sizes)
    assert result.distance_after == 0 < result.distance_before
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(written[k], original[k]) for k in original)
    tokens = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(scrambled)(input_ids=tokens).logits
        after = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=tokens).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_finetunes_of_one_base_need_no_permutation(family: dict[str, Path], tmp_path: Path) -> None:
    result = align(family["base"], family["ft1"], tmp_path / "out")
    record = json.loads((tmp_path / "out" / "permutations.json").read_text())
    assert all(v == list(range(len(v))) for v in record["perms"].values())
    assert result.distance_after == result.distance_before


def test_interpolate_writes_the_aligned_average(
    tmp_path: Path, two_mlps: tuple[Path, Path]
) -> None:
    a, b = two_mlps
    align(a, b, tmp_path / "aligned")
    align(a, b, tmp_path / "mid", AlignOptions(interpolate=0.25))
    aligned = load_file(tmp_path / "aligned" / "model.safetensors")
    mid = load_file(tmp_path / "mid" / "model.safetensors")
    reference = torch.load(a)
    for name, tensor in mid.items():
        torch.testing.assert_close(tensor, 0.75 * reference[name] + 0.25 * aligned[name])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reference", "{a}", "--merge-many", "{b}", "{out}"], "exactly one of --reference"),
        (["{a}", "{b}", "{out}"], "exactly one of --reference"),
        (["--reference", "{a}", "{b}", "{b}", "{out}"], "takes MODEL OUTPUT"),
    ],
)
def test_bad_command_is_one_line_and_writes_nothing(
    tmp_path: Path, two_mlps: tuple[Path, Path], args: list[str], message: str
) -> None:
    a, b = two_mlps
    values = {"a": a, "b": b, "out": tmp_path / "out"}
    result = run_cli("align", *[arg.format(**values) for arg in args])
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


@pytest.mark.parametrize(
    ("options", "target", "message"),
    [
        ({}, "{tmp}/nope.pt", "nope.pt' not found"),
        ({}, "{bad}", "tensor '2.bias' has shape [24]"),
        ({"spec": "{tmp}/no.yml"}, "{b}", "no.yml' not found"),
        ({"calibration": "{a}"}, "{b}", "needs --module"),
        ({"calibration": "{a}", "module": "{tmp}/n.py:f"}, "{b}", "add --interpolate"),
        ({"repair": True}, "{b}", "--repair needs calibration"),
        ({"interpolate": 2.0}, "{b}", "in [0, 1]"),
        ({"max_iter": 0}, "{b}", "at least 1"),
        ({"module": "{tmp}/net.py"}, "{b}", "give FILE.py:FUNCTION"),
        ({"module": "{tmp}/net.py:build"}, "{b}", "net.py' not found"),
    ],
)
def test_bad_options_raise_before_writing(
    tmp_path: Path,
    two_mlps: tuple[Path, Path],
    options: dict[str, object],
    target: str,
    message: str,
) -> None:
    a, b = two_mlps
    bad = tmp_path / "bad.pt"
    torch.save(state(mlp(0, widths=(12, 32, 20, 16, 5))), bad)
    values = {"a": a, "b": b, "tmp": tmp_path, "bad": bad}
    resolved = {
        k: Path(v.format(**values)) if isinstance(v, str) and k != "module" else v
        for k, v in options.items()
    }
    if "module" in options:
        resolved["module"] = str(options["module"]).format(**values)
    with pytest.raises(AlloyError) as caught:
        align(a, Path(target.format(**values)), tmp_path / "out", AlignOptions(**resolved))  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_kept(tmp_path: Path, two_mlps: tuple[Path, Path]) -> None:
    a, b = two_mlps
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(AlloyError, match="exists and is not empty"):
        align(a, b, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_print_spec_prints_yaml_and_writes_nothing(
    tmp_path: Path, two_mlps: tuple[Path, Path]
) -> None:
    result = run_cli("align", two_mlps[0], "--print-spec")
    assert result.returncode == 0, result.stderr
    assert "tensors:" in result.stdout and "2.weight: ['2', '0']" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_align_help_has_examples() -> None:
    result = run_cli("align", "--help")
    assert result.returncode == 0
    for flag in (
        "--reference",
        "--merge-many",
        "--spec",
        "--seed",
        "--max-iter",
        "--calibration",
        "--module",
        "--repair",
        "--interpolate",
        "--print-spec",
        "Examples:",
    ):
        assert flag in result.stdout, flag
