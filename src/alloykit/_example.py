"""``alloykit example``: build small example models from a transformers config and merge them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from alloykit.errors import AlloyError

EXAMPLES = ("task_arithmetic", "linear")


def render_example(method: str, models: Path) -> str:
    """The bundled recipe ``method`` with ``${MODELS}`` pointing at ``models``."""
    if method not in EXAMPLES:
        raise AlloyError(f"--method '{method}': bundled examples are {', '.join(EXAMPLES)}")
    text = resources.files("alloykit").joinpath("examples").joinpath(f"{method}.yml").read_text()
    return text.replace("${MODELS}", str(models.resolve()))


def run_example(folder: Path, method: str, *, quiet: bool = False) -> None:
    """Write example models and a recipe under ``folder``, merge, and load the result."""
    from alloykit import _output
    from alloykit.pipeline import MergeOptions, merge
    from alloykit.toymodels import make_family

    recipe_text = render_example(method, folder / "models")
    if not (folder / "models" / "family.json").is_file():
        _output.out.print(
            f"building example models (Llama config, random weights) in {folder / 'models'}"
        )
        make_family(folder / "models", finetunes=2, seed=0)
    recipe = folder / f"{method}.yml"
    recipe.write_text(recipe_text)
    output = folder / "merged"
    _output.out.print(f"running: alloykit merge {recipe} {output} --overwrite")
    with _output.MergeProgress(enabled=not quiet) as progress:
        result = merge(
            recipe,
            output,
            MergeOptions(overwrite=True),
            progress=progress.advance,
            on_plan=progress.start,
        )
    _output.print_result(result)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(output), output_loading_info=True)
    model, info = loaded
    problems = {k: v for k, v in info.items() if v}
    status = "no missing, unexpected or mismatched keys" if not problems else str(problems)
    parameters = sum(p.numel() for p in model.parameters())
    _output.out.print(
        f"loaded {output} with transformers: {type(model).__name__}, {parameters:,} parameters, {status}"
    )
