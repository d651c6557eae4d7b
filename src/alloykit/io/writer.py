"""Writing a merged model: safetensors shards, their index, config and tokenizer, atomically.

The plan knows every output tensor's name, shape and dtype before anything is computed, so
the shard layout (which tensor goes in which file, at which offset) is fixed up front and each
shard's header is written first. Tensors are then written straight to their offsets as they
are produced: memory holds one tensor, never a whole shard.

Everything goes into a temporary folder beside the output; it is renamed into place only when
the last file is written, so an interrupted or failed merge never leaves a folder that looks
complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import AlloyError, MergeError
from alloykit.io.checkpoint import DTYPE_CODES, SAFETENSORS_DTYPES

log = logging.getLogger("alloykit")

# Files copied from the donor model (base, else first) when no tokenizer is built.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTB]?|[KMGT]i?B)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 10**9,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes in a shard-size string: MergeKit's ``5B`` (5x10^9; K/M/B = 10^3/10^6/10^9),
    ``500MB``, ``2GiB`` or a plain integer.

    Example:
        >>> parse_size("5B"), parse_size("2GiB"), parse_size(1000)
        (5000000000, 2147483648, 1000)
    """
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if match is None:
            raise AlloyError(f"shard size '{text}' is not a size like 5B, 500MB or 2GiB")
        size = int(float(match[1]) * _UNITS[match[2].upper()])
    if size <= 0:
        raise AlloyError(f"shard size '{text}' must be positive")
    return size


@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor goes: its shard file and byte range in that shard's data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code
    file: str
    begin: int
    end: int


def layout_shards(
    tensors: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int
) -> list[list[TensorSlot]]:
    """Assign tensors, in order, to shards: MergeKit's rule (a new shard starts when adding the
    next tensor would pass the limit; one tensor larger than the limit gets a shard alone).
    Files are named ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``."""
    groups: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
    used = 0
    for name, shape, dtype in tensors:
        numel = 1
        for d in shape:
            numel *= d
        size = numel * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, shape, dtype, size))
        used += size
    count = len(groups)
    shards = []
    for i, group in enumerate(groups, start=1):
        file = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        offset = 0
        slots = []
        for name, shape, dtype, size in group:
            slots.append(TensorSlot(name, shape, dtype, file, offset, offset + size))
            offset += size
        shards.append(slots)
    return shards


def safetensors_header(slots: list[TensorSlot]) -> bytes:
    """The 8-byte length plus JSON header of a shard, padded with spaces to 8-byte alignment."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for slot in slots:
        header[slot.name] = {
            "dtype": slot.dtype,
            "shape": list(slot.shape),
            "data_offsets": [slot.begin, slot.end],
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class ShardWriter:
    """Writes tensors into the shards of a fixed layout, each straight to its offset.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with ShardWriter(folder, layout_shards([("w", (2,), "F32")], 5 * 10**9)) as writer:
        ...     writer.write("w", torch.ones(2))
        ...     writer.finish()
        >>> sorted(p.name for p in folder.iterdir())
        ['model.safetensors']
    """

    def __init__(self, folder: Path, shards: list[list[TensorSlot]]) -> None:
        self.folder = folder
        self.shards = shards
        self._slots = {slot.name: slot for shard in shards for slot in shard}
        self._data_start: dict[str, int] = {}
        self._files: dict[str, Any] = {}
        self._written: set[str] = set()
        for shard in shards:
            if not shard:
                continue
            header = safetensors_header(shard)
            handle = (folder / shard[0].file).open("wb")
            handle.write(header)
            handle.truncate(len(header) + shard[-1].end)
            self._files[shard[0].file] = handle
            self._data_start[shard[0].file] = len(header)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._files.values():
            handle.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name``; its shape and dtype must be the planned ones."""
        slot = self._slots[name]
        if tuple(tensor.shape) != slot.shape or DTYPE_CODES.get(tensor.dtype) != slot.dtype:
            raise MergeError(
                f"tensor '{name}': produced {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {slot.shape} {slot.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        handle = self._files[slot.file]
        handle.seek(self._data_start[slot.file] + slot.begin)
        handle.write(data.data)
        self._written.add(name)

    def finish(self, *, index: bool = True) -> None:
        """Close the shards and write the index; every planned tensor must have been written.

        ``index=False`` leaves the index to whoever writes the other shards (a distributed
        merge gives each worker some of the shards).
        """
        missing = set(self._slots) - self._written
        if missing:
            raise MergeError(f"output is incomplete: {len(missing)} tensors were never written")
        for handle in self._files.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        if index:
            write_index(self.folder, self.shards)


def write_index(folder: Path, shards: list[list[TensorSlot]]) -> None:
    """Write ``model.safetensors.index.json`` for a layout of more than one shard."""
    if len(shards) <= 1:
        return
    slots = [slot for shard in shards for slot in shard]
    index = {
        "metadata": {"total_size": sum(s.end - s.begin for s in slots)},
        "weight_map": {slot.name: slot.file for slot in slots},
    }
    text = json.dumps(index, indent=2) + "\n"
    (folder / "model.safetensors.index.json").write_text(text)


def shard_bytes(shard: list[TensorSlot]) -> int:
    """The size of a finished shard file: its header plus its data."""
    return len(safetensors_header(shard)) + (shard[-1].end if shard else 0)


class OutputFolder:
    """A temporary folder beside ``target`` that becomes ``target`` on :meth:`commit`.

    If the block exits without a commit (an error, Ctrl-C), the temporary folder is removed
    and ``target`` is untouched. An existing non-empty ``target`` is replaced only with
    ``overwrite``.
    """

    def __init__(self, target: Path, *, overwrite: bool) -> None:
        self.target = target
        self.overwrite = overwrite
        check_output_folder(target, overwrite=overwrite)
        self.path = target.parent / f".{target.name}.alloykit-partial-{os.getpid()}"

    def __enter__(self) -> OutputFolder:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        """Move the finished folder into place (replacing an old one when overwriting)."""
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.alloykit-old-{os.getpid()}"
            self.target.rename(old)
        self.path.rename(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output_folder(target: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty existing output folder unless ``overwrite``."""
    if target.exists() and not target.is_dir():
        raise AlloyError(f"output '{target}' exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise AlloyError(
            f"output folder '{target}' exists and is not empty; pass --overwrite to replace it"
        )


def transformers_dtype_key() -> str:
    """``dtype`` for transformers >= 5, ``torch_dtype`` before: the key config.json uses."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return "dtype"
    return "dtype" if major >= 5 else "torch_dtype"


def write_config(folder: Path, config: dict[str, Any], dtype: str) -> None:
    """Write ``config.json`` with the output dtype under the installed transformers' key."""
    config = dict(config)
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    config[transformers_dtype_key()] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_donor_files(folder: Path, donor: Path, *, tokenizer: bool, code: bool) -> list[str]:
    """Copy ``generation_config.json``, and the tokenizer and custom-code files when asked."""
    names = ["generation_config.json"]
    if tokenizer:
        names += TOKENIZER_FILES
    if code:
        names += sorted(p.name for p in donor.glob("*.py"))
    return copy_files(folder, donor, names)


def copy_files(folder: Path, source: Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Copy the files ``names`` that ``source`` has into ``folder``; return those copied."""
    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    return copied


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed when complete."""
    temporary = path.with_name(f".{path.name}.alloykit-partial-{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise AlloyError(f"cannot write '{path}' ({e.strerror}); check the folder exists") from e
