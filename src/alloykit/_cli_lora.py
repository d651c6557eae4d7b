"""``alloykit lora``: extract adapters from fine-tunes and merge adapters (wiring only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alloykit._cli_options import OverwriteOpt

lora_app = typer.Typer(
    name="lora",
    help="LoRA adapters: extract them from fine-tunes, merge several into one.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

EXTRACT_EXAMPLES = """Examples:

\b
  alloykit lora extract --base base/ --model finetune/ --rank 16 adapter/
  alloykit lora extract --base base/ --model finetune/ --energy 0.9 --rank 64 adapter/
  alloykit lora extract --base meta-llama/Llama-3.2-1B --model org/llama-math \\
      --rank 32 --modules q_proj,k_proj,v_proj,o_proj --embeddings adapter/
"""

MERGE_EXAMPLES = """Examples:

\b
  alloykit lora merge adapters.yml merged-adapter/
  alloykit lora merge adapters.yml merged-adapter/ --rank 32 --overwrite

\b
  # adapters.yml: any alloykit method on the full updates B·A, re-factorised to `rank`
  merge_method: ties            # or cat: exact, rank = the sum of the ranks
  base_model: base/             # default: the adapters' base_model_name_or_path
  rank: 16
  models:
    - model: adapters/math
      parameters: {weight: 1.0, density: 0.5}
    - model: adapters/code
      parameters: {weight: 1.0, density: 0.5}
"""

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No tables or warnings.")]


@lora_app.command(epilog=EXTRACT_EXAMPLES)
def extract(
    output: Annotated[
        Path, typer.Argument(metavar="OUT", help="Adapter folder; created when complete.")
    ],
    base: Annotated[str, typer.Option(help="Base model: a folder or repo id[@revision].")],
    model: Annotated[
        str, typer.Option(help="The fine-tune of BASE: a folder or repo id[@revision].")
    ],
    rank: Annotated[
        int | None,
        typer.Option(help="LoRA rank of every module (the largest one with --energy)."),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            help="Choose each module's rank: the fewest singular values holding this "
            "fraction of ‖ΔW‖² (0 < E <= 1)."
        ),
    ] = None,
    modules: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated module names to adapt (q_proj,v_proj); default: every "
            "Linear module."
        ),
    ] = None,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Adapt the input embeddings with LoRA too.")
    ] = False,
    head: Annotated[bool, typer.Option("--head", help="Adapt the LM head with LoRA too.")] = False,
    exact_limit: Annotated[
        int,
        typer.Option(
            help="Exact SVD when a matrix's smaller side is at most this, else randomized."
        ),
    ] = 1024,
    power_iterations: Annotated[
        int, typer.Option(min=0, help="Randomized SVD: power iterations.")
    ] = 4,
    seed: Annotated[int, typer.Option(help="Randomized SVD: seed of the sketch.")] = 0,
    device: Annotated[str, typer.Option(help="Where the SVDs run: cpu, cuda or auto.")] = "cpu",
    precision: Annotated[str, typer.Option(help="SVD precision: float32 or float64.")] = "float32",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract a PEFT LoRA adapter that turns BASE into (an approximation of) MODEL.

    Each adapted module's update W_model − W_base is factorised by truncated SVD. Norms,
    biases and (unless adapted) embeddings and head that changed are saved whole. The
    per-module relative error is printed and saved in OUT/alloykit_extract.json.
    """
    from alloykit import _output
    from alloykit.errors import AlloyError
    from alloykit.lora.extract import ExtractOptions, extract_lora, rank_summary
    from alloykit.lora.factorize import SvdOptions

    _output.setup_logging(quiet)
    if precision not in ("float32", "float64"):
        raise AlloyError(f"--precision '{precision}': use float32 or float64")
    names = tuple(m.strip() for m in modules.split(",") if m.strip()) if modules else None
    options = ExtractOptions(
        rank=rank,
        energy=energy,
        modules=names,
        embeddings=embeddings,
        head=head,
        svd=SvdOptions(
            exact_limit=exact_limit,
            power_iterations=power_iterations,
            seed=seed,
            precision="float64" if precision == "float64" else "float32",
            device=device,
        ),
        overwrite=overwrite,
    )
    result = extract_lora(base, model, output, options)
    if not quiet:
        width = max((len(r.module) for r in result.modules), default=6)
        _output.out.print(f"{'module':<{width}}  rank  full  svd         relative error")
        for r in result.modules:
            _output.out.print(
                f"{r.module:<{width}}  {r.rank:>4}  {r.full_rank:>4}  {r.svd:<10}  "
                f"{r.relative_error:.3e}"
            )
        if result.saved:
            _output.out.print(f"saved whole: {len(result.saved)} tensors ({result.saved[0]}, ...)")
    _output.out.print(f"{rank_summary(result.modules)}; wrote {result.output}")


@lora_app.command("merge", epilog=MERGE_EXAMPLES)
def merge_command(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Adapter-merge recipe (YAML).")],
    output: Annotated[
        Path, typer.Argument(metavar="OUT", help="Merged adapter folder; created when complete.")
    ],
    rank: Annotated[
        int | None,
        typer.Option(help="Target rank (overrides the recipe's rank; default: sum of ranks)."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where the merge arithmetic and SVDs run: cpu, cuda or auto.")
    ] = "cpu",
    seed: Annotated[
        int | None, typer.Option(help="Seed for methods that sample (DARE, DELLA).")
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge LoRA adapters of one base into one adapter.

    cat stacks the factors (exact: B·A is the weighted sum of the updates, rank = the sum of
    the ranks). Any other method merges the dense models W + scale·B·A as `alloykit merge`
    would, then re-factorises the merged update by SVD to the target rank and prints each
    module's relative error (also saved in OUT/alloykit_lora_merge.json).
    """
    from alloykit import _output
    from alloykit.errors import AlloyError
    from alloykit.lora.extract import rank_summary
    from alloykit.lora.factorize import SvdOptions
    from alloykit.lora.merge import LoraMergeOptions, merge_adapters

    _output.setup_logging(quiet)
    if rank is not None and rank <= 0:
        raise AlloyError(f"--rank {rank}: a LoRA rank must be a positive integer")
    options = LoraMergeOptions(
        rank=rank,
        device=device,
        seed=seed,
        svd=SvdOptions(precision="float64", device=device),
        overwrite=overwrite,
    )
    result = merge_adapters(config, output, options)
    if not quiet:
        width = max((len(r.module) for r in result.modules), default=6)
        _output.out.print(f"{'module':<{width}}  rank  full  re-factorisation error")
        for r in result.modules:
            _output.out.print(
                f"{r.module:<{width}}  {r.rank:>4}  {r.full_rank:>4}  {r.relative_error:.3e}"
            )
    _output.out.print(f"{result.method}: {rank_summary(result.modules)}; wrote {result.output}")
