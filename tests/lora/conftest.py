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


def make_adapter(
    base: Path, out: Path, spec: ToySpec | None = None, seed: int = 0, **lora: object
) -> Path:
    """A PEFT LoRA adapter of the toy model at ``base`` with random (non-zero) factors.

    ``lora`` holds LoraConfig arguments; by default rank 4, alpha 8 on q_proj and v_proj.
    """
    from peft import LoraConfig, get_peft_model

    settings: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    settings.update(lora)
    torch.manual_seed(seed)
    model = get_peft_model(load_model(base, spec), LoraConfig(init_lora_weights=False, **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # seeded factors of a realistic size: updates ~1/10 of the weights
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name:  # a "trained" copy of a saved module
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(str(out))
    return out


def merged_dense(base: Path, adapter: Path, out: Path, spec: ToySpec | None = None) -> Path:
    """``merge_and_unload`` of base + adapter, saved as a model folder (the reference)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, spec), str(adapter)).merge_and_unload()
    model.save_pretrained(str(out))
    return out


def run_alloykit(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``alloykit ARGS`` in this process (the CLI's own entry point and error boundary,
    without a new interpreter's import time); returns (exit code, stdout, stderr)."""
    import sys

    from alloykit.cli import main

    argv, sys.argv = sys.argv, ["alloykit", *map(str, args)]
    code: object = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return int(code or 0), captured.out, captured.err
