"""Raw state dicts (non-Hugging Face models): one .safetensors, .pt or .bin file, no config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit import merge, merge_to_state_dict
from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import open_checkpoint


def mlp_state(seed: int) -> dict[str, torch.Tensor]:
    """A small torch.nn MLP's state dict (names ``0.weight``, ``2.bias``, ...)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )  # fmt: skip
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    save_file(mlp_state(1), root / "a.safetensors")
    torch.save(mlp_state(2), root / "b.pt")
    torch.save(mlp_state(3), root / "c.bin")
    return {"a": root / "a.safetensors", "b": root / "b.pt", "c": root / "c.bin"}


def test_linear_merge_of_raw_files_is_tensor_by_tensor(
    raw_files: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(raw_files["a"]), "parameters": {"weight": 0.5}},
            {"model": str(raw_files["b"]), "parameters": {"weight": 0.3}},
            {"model": str(raw_files["c"]), "parameters": {"weight": 0.2}},
        ],
    }
    result = merge(config, tmp_path / "out")
    assert "config.json" not in result.files
    assert "model.safetensors" in result.files
    merged = load_file(result.output / "model.safetensors")
    a, b, c = mlp_state(1), mlp_state(2), mlp_state(3)
    assert set(merged) == set(a)
    for name, value in merged.items():
        expected = (
            0.5 * a[name].double() + 0.3 * b[name].double() + 0.2 * c[name].double()
        ).float()
        assert value.dtype == torch.float32 and value.shape == a[name].shape
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7, msg=name)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )  # fmt: skip
    model.load_state_dict(merged)  # the output is a valid state dict for the same module
    recipe = (result.output / "alloykit_config.yml").read_text()
    assert str(raw_files["b"].resolve()) in recipe


def test_raw_file_reads_back_exactly(raw_files: dict[str, Path]) -> None:
    for key, seed in (("a", 1), ("b", 2)):
        with open_checkpoint(raw_files[key]) as checkpoint:
            assert checkpoint.config is None
            for name, value in mlp_state(seed).items():
                assert torch.equal(checkpoint.read(name), value)


def test_task_arithmetic_against_a_raw_base(raw_files: dict[str, Path]) -> None:
    state = merge_to_state_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(raw_files["a"]),
            "models": [{"model": str(raw_files["b"]), "parameters": {"weight": 0.5}}],
        }
    )
    a, b = mlp_state(1), mlp_state(2)
    for name, value in state.items():
        torch.testing.assert_close(value, a[name] + 0.5 * (b[name] - a[name]), msg=name)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    whole_module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), whole_module)  # a pickled module, not a state dict
    with pytest.raises(CheckpointError, match="module.pt': cannot load safely") as error:
        open_checkpoint(whole_module)
    assert "\n" not in str(error.value)
    nested = tmp_path / "nested.bin"
    torch.save({"model": mlp_state(1), "epoch": 3}, nested)
    with pytest.raises(CheckpointError, match="nested.bin': entry 'model' is not a supported"):
        open_checkpoint(nested)


def test_other_paths_are_one_line_errors(tmp_path: Path, raw_files: dict[str, Path]) -> None:
    notes = tmp_path / "weights.txt"
    notes.write_text("not weights")
    config = {"merge_method": "linear", "models": [{"model": str(notes)}]}
    with pytest.raises(CheckpointError, match="weights.txt': not a model folder") as error:
        merge_to_state_dict(config)
    assert "\n" not in str(error.value)
    missing = {"merge_method": "linear", "models": [{"model": str(tmp_path / "absent.pt")}]}
    with pytest.raises(CheckpointError, match="absent.pt': no such file"):
        merge_to_state_dict(missing)
    with pytest.raises(CheckpointError, match="weights.txt' is not a model folder"):
        open_checkpoint(notes)


def test_a_pt_file_merged_alone_is_rewritten_as_safetensors(
    raw_files: dict[str, Path], tmp_path: Path
) -> None:
    result = merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(raw_files["b"]), "parameters": {"weight": 1.0}}],
        },
        tmp_path / "out",
    )
    assert not (result.output / "config.json").exists()
    merged = load_file(result.output / "model.safetensors")
    expected = mlp_state(2)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name
