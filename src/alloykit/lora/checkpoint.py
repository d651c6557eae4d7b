"""``base+adapter`` merge inputs: a base checkpoint read through a LoRA adapter.

MergeKit's ``path[@rev]+adapter[@rev]`` names a base model with an adapter applied. MergeKit
writes the merged model to a cache folder first; here the adapter is applied as each tensor is
read (``W + scale·B·A`` for adapted weights, the adapter's own tensor for ``modules_to_save``
and biases), so no merged copy is ever written and memory holds one tensor at a time.
"""

from __future__ import annotations

import torch

from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import SAFETENSORS_DTYPES, Checkpoint
from alloykit.io.hub import resolve_model
from alloykit.lora.adapter import Adapter, check_fits, read_adapter, weight_name


class AdaptedCheckpoint(Checkpoint):
    """``base`` with ``adapter`` applied tensor by tensor; names, shapes and dtypes are the base's.

    ``dtype`` None returns each adapted tensor in its stored dtype, rounded once as PEFT's
    ``merge_and_unload`` does; ``torch.float64`` keeps full precision (for adapter merging,
    where the update is recovered by subtracting the base).
    """

    def __init__(
        self,
        base: Checkpoint,
        adapter: Adapter,
        label: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.base = base
        self.adapter = adapter
        self.label = label or f"{base.label}+{adapter.label}"
        self.folder = base.folder
        self.config = base.config
        self.tensors = base.tensors
        self.dtype = dtype
        check_fits(adapter, {n: info.shape for n, info in base.tensors.items()}, base.label)
        self._updates = {weight_name(module): module for module in adapter.modules}

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of the adapted model."""
        # an adapter may store a whole tensor (modules_to_save, biases, or the base embedding
        # PEFT saves beside an embedding LoRA): it replaces the base's, updates apply on top
        if name in self.adapter.full:
            stored = self.adapter.full[name].to(SAFETENSORS_DTYPES[self.tensors[name].dtype])
        else:
            stored = self.base.read(name)
        module = self._updates.get(name)
        if module is None:
            return stored if self.dtype is None else stored.to(self.dtype)
        # float32 arithmetic, like PEFT's merge (float64 only when asked: a float64 copy of
        # a large embedding would double the memory of the read)
        work = self.dtype or torch.float32
        adapted = stored.to(work) + self.adapter.update(module, work)
        return adapted.to(self.dtype or stored.dtype)

    def close(self) -> None:
        self.base.close()


def resolve_adapter(path: str, revision: str | None = None) -> Adapter:
    """Read the adapter at ``path``: a local folder, or a Hub repo id fetched or cached."""
    folder = resolve_model(path, revision)
    if not folder.is_dir():
        raise CheckpointError(f"adapter '{path}': not an adapter folder")
    label = path + (f"@{revision}" if revision else "")
    return read_adapter(folder, label)


def open_adapted(
    base: Checkpoint,
    adapter_path: str,
    revision: str | None = None,
    label: str | None = None,
    dtype: torch.dtype | None = None,
) -> AdaptedCheckpoint:
    """``base`` read through the adapter at ``adapter_path`` (folder or repo id)."""
    return AdaptedCheckpoint(base, resolve_adapter(adapter_path, revision), label, dtype)
