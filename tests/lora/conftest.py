"""Fixtures for the LoRA tests: tiny model families and helpers to run them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alloykit.toymodels import ToySpec, make_family, model_class


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 base and one fine-tune: Conv1D weights stored (in, out)."""
    spec = ToySpec(model_type="gpt2", num_hidden_layers=2)
    return make_family(tmp_path_factory.mktemp("gpt2"), spec, finetunes=1)


def load_model(folder: Path, spec: ToySpec | None = None) -> torch.nn.Module:
    """A toy checkpoint loaded with transformers, in eval mode."""
    model = model_class(spec or ToySpec()).from_pretrained(folder)
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits on a fixed token sequence."""
    with torch.no_grad():
        return model(torch.arange(3, 19)[None]).logits[0].double()
