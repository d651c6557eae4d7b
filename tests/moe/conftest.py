"""Fixtures for the MoE tests: tiny dense families of each architecture an MoE takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from alloykit.toymodels import ToySpec, make_family


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft1, ft2: tiny Qwen2 models (attention biases)."""
    return make_family(tmp_path_factory.mktemp("qwen2"), ToySpec(model_type="qwen2"), finetunes=2)


@pytest.fixture(scope="session")
def qwen3_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft1, ft2: tiny Qwen3 models (q_norm, k_norm)."""
    return make_family(tmp_path_factory.mktemp("qwen3"), ToySpec(model_type="qwen3"), finetunes=2)


def load_model(folder: Path) -> Any:
    """Load a model folder with transformers, asserting no key is missing or unexpected."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    return model.eval()


def expert_config(base: Path, experts: list[Path], **extra: Any) -> dict[str, Any]:
    """An MoE config dict: ``experts`` with distinct prompts (word tokens of their own)."""
    return {
        "base_model": str(base),
        "experts": [
            {
                "source_model": str(folder),
                "positive_prompts": [f"w{10 * i + 3} w{10 * i + 4} w{10 * i + 5}"],
            }
            for i, folder in enumerate(experts)
        ],
        **extra,
    }
