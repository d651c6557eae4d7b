"""Checkpoint indexing: names, shapes and dtypes without reading data; .bin through safe loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.hub import looks_like_repo_id, resolve_model


def test_sharded_index_is_read_from_headers(sharded_family: dict[str, Path]) -> None:
    with Checkpoint(sharded_family["base"]) as ckpt:
        assert len({info.file for info in ckpt.tensors.values()}) > 2
        info = ckpt.tensors["model.layers.1.mlp.up_proj.weight"]
        assert info.shape == (64, 32) and info.dtype == "BF16"
        assert ckpt.read(info.name).dtype == torch.bfloat16
        assert ckpt.config is not None and ckpt.config["model_type"] == "llama"


def test_missing_shard_is_named(tmp_path: Path, sharded_family: dict[str, Path]) -> None:
    folder = Path(shutil.copytree(sharded_family["ft1"], tmp_path / "m"))
    victim = sorted(folder.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard '{victim.name}', which is missing"):
        Checkpoint(folder)


def test_pytorch_bin_is_read_with_weights_only_mmap(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(family["ft1"] / "config.json", folder / "config.json")
    state = load_file(family["ft1"] / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    with Checkpoint(folder) as ckpt:
        assert set(ckpt.tensors) == set(state)
        assert torch.equal(ckpt.read("model.norm.weight"), state["model.norm.weight"])


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights in"):
        Checkpoint(tmp_path, "empty-model")


def test_repo_id_shapes() -> None:
    assert looks_like_repo_id("org/name") and looks_like_repo_id("gpt2")
    assert not looks_like_repo_id("./local") and not looks_like_repo_id("/abs/path")
    assert not looks_like_repo_id("a/b/c")


def test_repo_id_resolves_offline_from_the_local_cache(
    tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo id is served from the Hugging Face cache layout with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--alloykit-test--tiny-llama"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(family["ft1"], snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = resolve_model("alloykit-test/tiny-llama")
    assert folder.resolve() == snapshot.resolve()
    with Checkpoint(folder) as ckpt:
        assert "model.norm.weight" in ckpt.tensors
    with pytest.raises(
        CheckpointError,
        match="'alloykit-test/absent': no such folder, and the Hugging Face Hub cannot provide it",
    ):
        resolve_model("alloykit-test/absent")
