"""GGUF files (llama.cpp's format) as merge inputs, read lazily and named the Hugging Face way.

A :class:`GGUFCheckpoint` indexes a ``.gguf`` file with the ``gguf`` package's reader (the
header and tensor table only) and keeps, for each tensor, its byte range and GGML type. A
tensor is read with ``pread`` and dequantised when it is merged, never before: F32, F16 and
BF16 are returned exactly as stored, F64 as float64, quantised types (Q8_0, Q4_K, ...) are
dequantised to float32 by ``gguf.quants.dequantize``.

The model's ``config.json`` is what transformers builds from the GGUF metadata
(``AutoConfig.from_pretrained(folder, gguf_file=...)``), with ``architectures`` added. Tensor
names are mapped to the Hugging Face names of that config's model through gguf's
``get_tensor_name_map``, as transformers does when it loads a GGUF file; the query and key
projections of llama-architecture files, which llama.cpp's converter permutes for its rotary
embedding layout, are permuted back. The tokenizer stored in a GGUF file is not converted:
a merge whose donor is a GGUF file writes no tokenizer files (take the tokenizer from the
original Hugging Face model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import Checkpoint, TensorInfo

log = logging.getLogger("alloykit")

# llama.cpp's converter reorders the rows of attn_q/attn_k (weights and biases) for these
# architectures (general.architecture) so that its rope pairs adjacent values.
_PERMUTED_ARCHITECTURES = frozenset({"llama"})
# Architectures whose GGUF tensors need conversions besides renaming (split or fused experts,
# transposed or offset weights, ...), which transformers applies and alloykit does not.
_CONVERTED_ARCHITECTURES = frozenset(
    {
        "qwen2moe",
        "qwen3moe",
        "gpt-oss",
        "gpt_oss",
        "bloom",
        "t5",
        "t5encoder",
        "gpt2",
        "mamba",
        "nemotron",
        "gemma2",
        "gemma3",
        "lfm2",
        "minimax-m2",
    }
)


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the only ``.gguf`` in a folder without
    safetensors weights; None when ``path`` is not a GGUF model.

    Raises CheckpointError for a folder holding several ``.gguf`` files and no safetensors.
    """
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise CheckpointError(
            f"'{path}' holds {len(files)} GGUF files ({names}); name the one to merge "
            "(a path ending in .gguf)"
        )
    return files[0] if files else None


class GGUFCheckpoint(Checkpoint):
    """A GGUF file opened for reading, its tensors under their Hugging Face names.

    ``tensors`` describes each tensor as :meth:`read` returns it: dtype F32, F16, BF16 or F64
    for unquantised tensors, F32 for quantised ones (dequantised on read).
    """

    def __init__(self, file: Path, label: str | None = None) -> None:
        self.folder = file  # no tokenizer or generation files are copied from a GGUF file
        self.label = label or str(file)
        self.file = file
        self._descriptors: dict[Path, int] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        entries, architecture = _read_table(file)
        if architecture in _CONVERTED_ARCHITECTURES:
            raise CheckpointError(
                f"'{file}': GGUF architecture '{architecture}' stores tensors that need "
                "conversions besides renaming, which alloykit does not implement; convert the "
                "file to a Hugging Face model first (transformers: from_pretrained(folder, "
                "gguf_file=...) then save_pretrained)"
            )
        hf_config = _build_config(file)
        self.config = hf_config.to_dict()
        if not self.config.get("architectures"):
            self.config["architectures"] = [_causal_lm_class(file, hf_config)]
        shapes = _hf_parameter_shapes(file, hf_config)
        indices = [e.name.split(".")[1] for e in entries if e.name.startswith("blk.")]
        blocks = [int(index) for index in indices if index.isdigit()]
        names = _gguf_to_hf_names(file, architecture, shapes, max(blocks, default=-1) + 1)
        self._entries: dict[str, _Entry] = {}
        self.tensors = {}
        self.skipped: list[str] = []
        permute = architecture in _PERMUTED_ARCHITECTURES
        for entry in entries:
            hf_name = names.get(entry.name)
            if hf_name is None:
                self.skipped.append(entry.name)
                continue
            if entry.shape != shapes[hf_name]:
                raise CheckpointError(
                    f"'{file}': tensor '{entry.name}' has shape {list(entry.shape)}, but "
                    f"'{hf_name}' of the model its metadata describes has "
                    f"{list(shapes[hf_name])}"
                )
            if permute and (".attn_q." in entry.name or ".attn_k." in entry.name):
                key = "num_attention_heads" if ".attn_q." in entry.name else "num_key_value_heads"
                entry.heads = int(self.config.get(key) or self.config["num_attention_heads"])
            self._entries[hf_name] = entry
            self.tensors[hf_name] = TensorInfo(
                hf_name, entry.shape, entry.dtype, file, entry.offset
            )
        if self.skipped:
            log.warning(
                f"'{file}': {len(self.skipped)} GGUF tensors have no Hugging Face name and are "
                f"not merged: {', '.join(self.skipped[:5])}"
                + (", ..." if len(self.skipped) > 5 else "")
            )

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantised (quantised types to float32), on the CPU."""
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"model '{self.label}' has no tensor '{name}'")
        raw = self._read_bytes(self.file, entry.offset, entry.nbytes, entry.name)
        if entry.quantized:
            import gguf

            try:
                values = gguf.quants.dequantize(
                    raw.numpy().reshape(entry.byte_shape), entry.ggml_type
                )
            except (NotImplementedError, ValueError) as e:
                raise CheckpointError(
                    f"'{self.file}': cannot dequantise tensor '{entry.name}' "
                    f"({entry.ggml_type.name}: {e})"
                ) from e
            tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            tensor = tensor.reshape(entry.shape)
        else:
            tensor = raw.view(DTYPE_TORCH[entry.dtype]).reshape(entry.shape)
        if entry.heads is not None:
            tensor = _unpermute_rows(tensor, entry.heads)
        return tensor


# GGML types read as stored; every other type is dequantised to float32
DTYPE_TORCH = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


@dataclass
class _Entry:
    """Where one GGUF tensor lies and how to decode it."""

    name: str
    ggml_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (GGUF lists dimensions innermost first)
    offset: int
    nbytes: int
    heads: int | None = None  # set for llama.cpp-permuted query/key rows

    @property
    def quantized(self) -> bool:
        return str(self.ggml_type.name) not in DTYPE_TORCH

    @property
    def dtype(self) -> str:
        """The safetensors code of the tensor :meth:`GGUFCheckpoint.read` returns."""
        return "F32" if self.quantized else str(self.ggml_type.name)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the raw bytes ``gguf.quants.dequantize`` expects (rows of blocks)."""
        import gguf

        return tuple(gguf.quants.quant_shape_to_byte_shape(self.shape, self.ggml_type))


def _read_table(file: Path) -> tuple[list[_Entry], str]:
    """The file's tensor table and ``general.architecture``, checking the data is all there."""
    import gguf

    try:
        reader = gguf.GGUFReader(file)
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ... on bad bytes
        raise CheckpointError(
            f"'{file}': not a readable GGUF file, corrupted or truncated "
            f"({type(e).__name__}: {_one_line(e)}); download or copy it again"
        ) from e
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise CheckpointError(f"'{file}': GGUF metadata has no general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    size = file.stat().st_size
    entries = []
    for tensor in reader.tensors:
        if tensor.tensor_type.name in ("I8", "I16", "I32", "I64"):
            raise CheckpointError(
                f"'{file}': tensor '{tensor.name}' is an integer tensor "
                f"({tensor.tensor_type.name}), which alloykit does not merge"
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        entry = _Entry(
            tensor.name, tensor.tensor_type, shape, int(tensor.data_offset), int(tensor.n_bytes)
        )
        if entry.offset + entry.nbytes > size:
            raise CheckpointError(
                f"'{file}': truncated GGUF file (tensor '{tensor.name}' ends at byte "
                f"{entry.offset + entry.nbytes}, the file has {size}); download or copy it again"
            )
        entries.append(entry)
    del reader  # drops the memory map: tensors are read with pread when merged
    return entries, architecture


def _build_config(file: Path) -> Any:
    """The transformers config that transformers builds from the file's metadata."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError, ...
        raise CheckpointError(
            f"'{file}': transformers cannot build a model config from the GGUF metadata "
            f"({type(e).__name__}: {_one_line(e)})"
        ) from e


def _causal_lm_class(file: Path, hf_config: Any) -> str:
    """The ``*ForCausalLM`` class name transformers uses for the config's model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
    if name is None:
        raise CheckpointError(
            f"'{file}': transformers has no causal language model for model_type "
            f"'{hf_config.model_type}'"
        )
    return str(name)


def _hf_parameter_shapes(file: Path, hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters of the config's causal LM (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # transformers raises ValueError, KeyError, ...
        raise CheckpointError(
            f"'{file}': transformers cannot build the model its GGUF metadata describes "
            f"({type(e).__name__}: {_one_line(e)})"
        ) from e
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _gguf_to_hf_names(
    file: Path, architecture: str, shapes: dict[str, tuple[int, ...]], layers: int
) -> dict[str, str]:
    """``{GGUF tensor name: Hugging Face name}`` for the model's parameters.

    gguf's name map goes from Hugging Face module names (of every model family) to GGUF names,
    so it is asked for each parameter of the actual model. A name it does not know is tried
    without its leading components (``model.embed_tokens`` as ``embed_tokens``), for models
    whose converter started from the inner module.
    """
    import gguf

    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise CheckpointError(
            f"'{file}': GGUF architecture '{architecture}' is unknown to the installed gguf "
            "package; upgrade gguf"
        )
    name_map = gguf.get_tensor_name_map(arch, layers)
    names: dict[str, str] = {}
    for hf_name in shapes:
        module, dot, leaf = hf_name.rpartition(".")
        if leaf not in ("weight", "bias") or not dot:
            module, leaf = hf_name, ""
        parts = module.split(".")
        for start in range(len(parts)):
            gguf_module = name_map.get_name(".".join(parts[start:]))
            if gguf_module is not None:
                gguf_name = f"{gguf_module}.{leaf}" if leaf else gguf_module
                names.setdefault(gguf_name, hf_name)
                break
    return names


def _unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's query/key row order: within each head, its converter moved row
    ``i * half + j`` to ``2 * j + i`` (i in {0, 1}); this moves it back."""
    rows = tensor.shape[0]
    half = rows // heads // 2
    grouped = tensor.reshape(heads, half, 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape).contiguous()


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
