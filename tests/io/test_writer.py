"""The shard writer: layout rule, header bytes, round trip, and atomic output folders."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloykit.errors import AlloyError
from alloykit.io import writer as writer_module
from alloykit.io.writer import (
    OutputFolder,
    ShardWriter,
    layout_shards,
    parse_size,
    safetensors_header,
    write_config,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5B", 5 * 10**9),
        ("500M", 5 * 10**8),
        ("1K", 1000),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        (77, 77),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(AlloyError, match="'five' is not a size"):
        parse_size("five")


def test_layout_follows_mergekit_rule() -> None:
    tensors = [("a", (10,), "F32"), ("b", (10,), "F32"), ("big", (100,), "F32"), ("c", (5,), "F32")]
    shards = layout_shards(tensors, max_shard_bytes=80)
    assert [[s.name for s in shard] for shard in shards] == [["a", "b"], ["big"], ["c"]]
    assert shards[0][1].begin == 40 and shards[0][1].end == 80
    assert shards[1][0].file == "model-00002-of-00003.safetensors"
    assert layout_shards(tensors, 10**9)[0][0].file == "model.safetensors"


def test_header_golden_bytes() -> None:
    (shard,) = layout_shards([("w", (2,), "F32"), ("b", (1,), "BF16")], 10**9)
    expected_json = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}'
    padded = expected_json + b" " * (-len(expected_json) % 8)
    assert safetensors_header(shard) == len(padded).to_bytes(8, "little") + padded


def test_round_trip_in_any_write_order(tmp_path: Path) -> None:
    tensors = {
        "x": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "y": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "z": torch.ones(4, dtype=torch.float16),
    }
    shards = layout_shards(
        [
            (
                k,
                tuple(v.shape),
                {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[v.dtype],
            )
            for k, v in tensors.items()
        ],
        24,
    )
    with ShardWriter(tmp_path, shards) as writer:
        for name in ("z", "x", "y"):
            writer.write(name, tensors[name])
        writer.finish()
    loaded = {}
    for file in tmp_path.glob("*.safetensors"):
        loaded.update(load_file(file))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 24 + 4 + 8


def _odd_tensors() -> dict[str, torch.Tensor]:
    """Tensors whose sizes and offsets are not multiples of a block (seeded)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [3, 1, 5000, 4093, 12289, 7, 2048]
    return {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


def _write(folder: Path, tensors: dict[str, torch.Tensor], order: list[str], shard: int) -> dict:
    folder.mkdir()
    shards = layout_shards([(k, tuple(v.shape), "F32") for k, v in tensors.items()], shard)
    with ShardWriter(folder, shards) as writer:
        for name in order:
            writer.write(name, tensors[name])
        writer.finish()
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("shard", [10**9, 40_000])
@pytest.mark.parametrize("forward", [True, False])
def test_direct_writes_give_the_buffered_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard: int, forward: bool
) -> None:
    """Front to back (direct I/O through a small buffer) or in any other order, the files are
    the ones buffered writes give; every direct write is whole aligned blocks."""
    tensors = _odd_tensors()
    order = list(tensors) if forward else list(reversed(tensors))
    monkeypatch.setenv("ALLOYKIT_DIRECT_IO", "0")
    expected = _write(tmp_path / "buffered", tensors, order, shard)
    monkeypatch.delenv("ALLOYKIT_DIRECT_IO")
    if writer_module._open_direct(tmp_path / "buffered" / next(iter(expected))) is None:
        pytest.skip("no direct I/O on this file system")
    monkeypatch.setattr(writer_module, "_STAGE", 3 * 4096)  # many buffer refills
    calls: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls.append((offset, len(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    assert _write(tmp_path / "direct", tensors, order, shard) == expected
    assert all(offset % 4096 == 0 and count % 4096 == 0 for offset, count in calls)
    total = sum(len(b) for b in expected.values())
    if forward:  # every byte but the padding went directly
        assert sum(count for _, count in calls) >= total
    elif shard == 10**9:  # one shard, its first write not at the front: none went directly
        assert calls == []


def test_a_file_system_refusing_direct_io_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = _odd_tensors()
    monkeypatch.setenv("ALLOYKIT_DIRECT_IO", "0")
    expected = _write(tmp_path / "buffered", tensors, list(tensors), 10**9)
    monkeypatch.delenv("ALLOYKIT_DIRECT_IO")
    monkeypatch.setattr(writer_module, "_STAGE", 4096)

    def refuse(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer_module.os, "pwrite", refuse)
    assert _write(tmp_path / "direct", tensors, list(tensors), 10**9) == expected


def test_unwritten_tensor_is_an_error(tmp_path: Path) -> None:
    shards = layout_shards([("a", (1,), "F32"), ("b", (1,), "F32")], 10**9)
    with ShardWriter(tmp_path, shards) as writer:
        writer.write("a", torch.ones(1))
        with pytest.raises(AlloyError, match="1 tensors were never written"):
            writer.finish()


def test_wrong_shape_is_an_error(tmp_path: Path) -> None:
    shards = layout_shards([("a", (2,), "F32")], 10**9)
    with ShardWriter(tmp_path, shards) as writer, pytest.raises(AlloyError, match="planned"):
        writer.write("a", torch.ones(3))


def test_output_folder_appears_only_on_commit(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), OutputFolder(target, overwrite=False) as folder:
        (folder.path / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with OutputFolder(target, overwrite=False) as folder:
        (folder.path / "done").write_text("ok")
        folder.commit()
    assert (target / "done").read_text() == "ok"
    with pytest.raises(AlloyError, match="not empty; pass --overwrite"):
        OutputFolder(target, overwrite=False)


def test_config_dtype_key_follows_installed_transformers(tmp_path: Path) -> None:
    import transformers

    write_config(tmp_path, {"model_type": "llama", "torch_dtype": "float32"}, "bfloat16")
    written = json.loads((tmp_path / "config.json").read_text())
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    assert written[key] == "bfloat16"
    assert ("torch_dtype" in written) == (key == "torch_dtype")
