"""Lazy access to a model's weights: names, shapes and dtypes without reading tensor data.

A :class:`Checkpoint` indexes a model folder (single or sharded safetensors with their index,
or ``pytorch_model*.bin`` through ``torch.load(weights_only=True, mmap=True)``) by reading
only the safetensors headers, checks that every file is complete, and reads a tensor when
asked for it.

Safetensors tensors are read with ``pread`` into a fresh tensor (:meth:`Checkpoint.read`), or
converted straight from a mapping of just that tensor's pages into a caller's buffer
(:meth:`Checkpoint.read_into`, the merge's reader: no kernel copy, 3-6x faster on this
project's machine). No file stays mapped: with a whole-file mapping every input byte read so
far would count as resident until the file closes; here the mapping is closed after each
tensor, so resident memory stays at the tensors held.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a stored tensor before reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...
    file: Path
    offset: int = 0  # where the tensor's bytes start in a safetensors file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=SAFETENSORS_DTYPES[self.dtype]).element_size()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Index one safetensors file from its header, checking the file holds all its data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"'{path}': truncated safetensors file ({size} bytes)")
            (header_size,) = struct.unpack("<Q", head)
            if header_size > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"'{path}': corrupted or truncated safetensors file "
                    f"(header claims {header_size} bytes, file has {size}); download it again"
                )
            header = json.loads(f.read(header_size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}': cannot read the safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}': corrupted safetensors header")
    header.pop("__metadata__", None)
    tensors = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"'{path}': corrupted header entry for tensor '{name}'") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"'{path}': tensor '{name}' has unsupported dtype {dtype}")
        info = TensorInfo(name, shape, dtype, path, 8 + header_size + begin)
        if end - begin != info.nbytes:
            raise CheckpointError(f"'{path}': tensor '{name}' has inconsistent offsets")
        data_end = max(data_end, end)
        tensors[name] = info
    if 8 + header_size + data_end > size:
        raise CheckpointError(
            f"'{path}': truncated safetensors file (needs {8 + header_size + data_end} bytes, "
            f"has {size}); download or copy it again"
        )
    return tensors


_GRANULE = mmap.ALLOCATIONGRANULARITY  # a mapping starts at a multiple of this


class Checkpoint:
    """A model folder opened for reading: its ``config.json`` and an index of its tensors.

    ``folder`` may also be a single ``.safetensors``, ``.pt`` or ``.bin`` file: a raw state
    dict (a non-Hugging Face model) with no config, whose tensors are merged by name.

    Tensors are read on demand with :meth:`read`; nothing is loaded when the checkpoint is
    opened. A checkpoint holds open file handles, so close it (or use it as a context manager).

    Example:
        >>> with Checkpoint(Path("models/base")) as ckpt:  # doctest: +SKIP
        ...     w = ckpt.read("model.embed_tokens.weight")
    """

    def __init__(self, folder: Path, label: str | None = None) -> None:
        self.folder = folder
        self.label = label or str(folder)
        # a lone weight file is a raw state dict: no config, its tensors merged by name
        self.config = None if folder.is_file() else _read_config(folder)
        quantization = (self.config or {}).get("quantization_config")
        if quantization is not None:
            method = (
                quantization.get("quant_method", "unknown")
                if isinstance(quantization, dict)
                else "unknown"
            )
            raise CheckpointError(
                f"model '{self.label}' is quantized (quant_method: {method}); quantized inputs "
                "are not supported: dequantize it first (load it with transformers and "
                "save_pretrained it in float16 or bfloat16)"
            )
        self.tensors: dict[str, TensorInfo] = {}
        self._descriptors: dict[Path, int] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        for file in [folder] if folder.is_file() else _weight_files(folder, self.label):
            infos = (
                read_safetensors_header(file)
                if file.suffix == ".safetensors"
                else self._index_pickle(file)
            )
            self.tensors.update(infos)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the open files and memory maps."""
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()
        self._pickles.clear()

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (dtype and shape), on the CPU."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"model '{self.label}' has no tensor '{name}'")
        if info.file.suffix != ".safetensors":
            return self._pickles[info.file][name]
        buffer = self._read_bytes(info.file, info.offset, info.nbytes, name)
        return buffer.view(SAFETENSORS_DTYPES[info.dtype]).reshape(info.shape)

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype tensor ``name`` is stored in (None: no such tensor)."""
        info = self.tensors.get(name)
        return SAFETENSORS_DTYPES[info.dtype] if info is not None else None

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor ``name`` converted into ``out`` (a contiguous CPU tensor of its shape).

        Safetensors data is copied (and converted) straight from the file's pages, mapped for
        the one tensor and unmapped after: no copy of the raw bytes is made, and the mapping
        never holds more than the tensor.
        """
        if type(self).read is not Checkpoint.read:  # a subclass transforms what it reads
            out.copy_(self.read(name))
            return
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"model '{self.label}' has no tensor '{name}'")
        if (
            info.file.suffix != ".safetensors"
            or out.device.type != "cpu"
            or not out.is_contiguous()
            or tuple(out.shape) != tuple(info.shape)
        ):
            out.copy_(self.read(name))
            return
        if info.nbytes == 0:
            return
        stored = SAFETENSORS_DTYPES[info.dtype]
        region = self._map(info.file, info.offset, info.nbytes, name)
        try:
            with warnings.catch_warnings():  # read-only pages: torch warns, nothing writes them
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(
                    region, dtype=torch.uint8, count=info.nbytes, offset=info.offset % _GRANULE
                )
            out.view(-1).copy_(raw.view(stored))
            del raw  # the mapping closes only once nothing views it
        finally:
            region.close()

    def _descriptor(self, file: Path) -> int:
        """``file`` opened for reading, once per checkpoint (closed by :meth:`close`)."""
        descriptor = self._descriptors.get(file)
        if descriptor is None:
            descriptor = self._descriptors[file] = os.open(file, os.O_RDONLY)
        return descriptor

    def _map(self, file: Path, offset: int, count: int, name: str) -> mmap.mmap:
        """A read-only mapping of ``count`` bytes of ``file`` from ``offset``, starting at the
        allocation granule at or before it."""
        start = offset - offset % _GRANULE
        try:
            descriptor = self._descriptor(file)
            if os.fstat(descriptor).st_size < offset + count:
                raise OSError("unexpected end of file")
            return mmap.mmap(descriptor, offset + count - start, prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"'{file}': cannot read tensor '{name}' ({e})") from e

    def _read_bytes(self, file: Path, offset: int, count: int, name: str) -> torch.Tensor:
        """``count`` bytes of ``file`` from ``offset`` (tensor ``name``'s), as a uint8 tensor."""
        try:
            descriptor = self._descriptor(file)
            buffer = torch.empty(count, dtype=torch.uint8)
            view = buffer.numpy().data
            done = 0
            while done < count:  # pread may return less than asked
                got = os.preadv(descriptor, [view[done:]], offset + done)
                if got == 0:
                    raise OSError("unexpected end of file")
                done += got
        except OSError as e:
            raise CheckpointError(f"'{file}': cannot read tensor '{name}' ({e})") from e
        return buffer

    def _index_pickle(self, file: Path) -> dict[str, TensorInfo]:
        if not zipfile.is_zipfile(file):
            raise CheckpointError(
                f"'{file}': an old (pre-zip) PyTorch pickle, which cannot be read safely; "
                "re-save the model as safetensors (model.save_pretrained(path))"
            )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(
                f"'{file}': cannot load safely with torch.load(weights_only=True) "
                f"({_refusal_reason(e)}); it holds pickled objects besides tensors: save only "
                "the tensors (torch.save(model.state_dict(), ...)) or as safetensors"
            ) from e
        if not isinstance(state, dict):
            raise CheckpointError(f"'{file}': holds a {type(state).__name__}, not a state dict")
        self._pickles[file] = state
        infos = {}
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in DTYPE_CODES:
                raise CheckpointError(f"'{file}': entry '{name}' is not a supported tensor")
            infos[name] = TensorInfo(name, tuple(tensor.shape), DTYPE_CODES[tensor.dtype], file)
        return infos


RAW_SUFFIXES = (".safetensors", ".pt", ".bin")


def open_checkpoint(path: Path, label: str | None = None) -> Checkpoint:
    """Open a model folder, a raw state-dict file or a GGUF file (or a folder holding one).

    Raises CheckpointError naming ``path`` when it is none of these.
    """
    from alloykit.io.gguf import GGUFCheckpoint, find_gguf

    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return GGUFCheckpoint(gguf_file, label or str(path))
    if path.is_dir() or (path.is_file() and path.suffix in RAW_SUFFIXES):
        return Checkpoint(path, label)
    raise CheckpointError(
        f"model '{label or path}': '{path}' is not a model folder, a .safetensors, .pt or .bin "
        "state dict, nor a .gguf file"
    )


def _refusal_reason(error: Exception) -> str:
    """The line of torch.load's many-line refusal that says what it refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else type(error).__name__


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    return read_json_object(path) if path.is_file() else None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object; a clear :class:`CheckpointError` naming it otherwise."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}': not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"'{path}': not a JSON object")
    return value


def _weight_files(folder: Path, label: str) -> list[Path]:
    """The weight files of a folder, safetensors preferred, checked against their index."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"'{index}': not a valid shard index ({e})") from e
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"'{index}' lists shard '{missing[0]}', which is missing from '{folder}'"
                )
            return files
        if (folder / single).is_file():
            return [folder / single]
    loose = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if loose:
        return loose
    raise CheckpointError(
        f"model '{label}': no weights in '{folder}' (expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin)"
    )
