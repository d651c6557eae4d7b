"""LoRA adapters: extraction from a fine-tune, adapters as merge inputs, adapter merging.

- :mod:`alloykit.lora.adapter`: PEFT adapters in memory, read and written;
- :mod:`alloykit.lora.checkpoint`: ``base+adapter`` inputs, applied tensor by tensor;
- :mod:`alloykit.lora.factorize`: exact and randomized truncated SVD;
- :mod:`alloykit.lora.extract`: ``alloykit lora extract``;
- :mod:`alloykit.lora.merge`: ``alloykit lora merge``.
"""

from __future__ import annotations

from alloykit.lora.adapter import Adapter, LoraModule, read_adapter
from alloykit.lora.extract import ExtractOptions, ExtractResult, extract_lora

__all__ = [
    "Adapter",
    "ExtractOptions",
    "ExtractResult",
    "LoraModule",
    "extract_lora",
    "read_adapter",
]
