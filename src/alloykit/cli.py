"""The ``alloykit`` command: wiring only; each command is a thin layer over a library call.

Errors from alloykit (:class:`~alloykit.errors.AlloyError`) are printed as one line with a
non-zero exit; set ``ALLOYKIT_DEBUG=1`` for the full traceback. Heavy imports (torch,
transformers) happen inside commands so ``alloykit --help`` starts fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="alloykit",
    help="Merge the weights of models fine-tuned from one base (MergeKit-compatible YAML).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

MERGE_EXAMPLES = """Examples:

\b
  alloykit merge recipe.yml merged/                  # merge on the CPU
  alloykit merge recipe.yml merged/ --dry-run        # print the plan, read no tensor
  alloykit merge recipe.yml merged/ --device auto --out-shard-size 2GiB --overwrite
  alloykit merge merged/alloykit_config.yml again/   # re-run a recipe written by a merge
  alloykit merge stages.yml merged/ --intermediate-dir work/   # multi-document recipe
"""

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings.")]


def _version(value: bool) -> None:
    if value:
        from alloykit import __version__

        typer.echo(f"alloykit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Merge the weights of models fine-tuned from one base (MergeKit-compatible YAML)."""


@app.command(epilog=MERGE_EXAMPLES)
def merge(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Merge recipe (MergeKit YAML).")],
    output: Annotated[
        Path,
        typer.Argument(metavar="OUTPUT", help="Output folder; created when the merge is complete."),
    ],
    device: Annotated[
        str, typer.Option(help="Where the arithmetic runs: cpu, cuda or auto.")
    ] = "cpu",
    cuda: Annotated[bool, typer.Option("--cuda", help="Same as --device cuda.")] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            "--random-seed",
            help="Seed for methods that sample (DARE, DELLA); same seed, same output.",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", "-j", min=1, help="CPU threads for the arithmetic."),
    ] = None,
    out_shard_size: Annotated[
        str,
        typer.Option(
            help="Largest output shard in bytes: 5B = 5x10^9 (MergeKit's meaning), 500MB, 2GiB."
        ),
    ] = "5B",
    copy_tokenizer: Annotated[
        bool,
        typer.Option(
            "--copy-tokenizer/--no-copy-tokenizer", help="Copy the base model's tokenizer files."
        ),
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan (tensor, inputs, method, parameters) and stop."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Parameters the method does not use are errors.")
    ] = False,
    allow_crimes: Annotated[
        bool, typer.Option("--allow-crimes", help="Merge models of different architectures.")
    ] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code", help="Copy a custom-code model's *.py files into the output."
        ),
    ] = False,
    precision: Annotated[
        str, typer.Option(help="Working precision: float32 or float64.")
    ] = "float32",
    intermediate_dir: Annotated[
        Path | None,
        typer.Option(
            help="Multi-stage recipes: write intermediate models here instead of keeping them in memory."
        ),
    ] = None,
    model_card: Annotated[
        bool,
        typer.Option(
            "--model-card/--no-model-card",
            help="Write README.md (method, inputs with hashes, recipe) into the output.",
        ),
    ] = True,
    checks: Annotated[
        bool,
        typer.Option(
            "--checks/--no-checks",
            help="Warn about coefficients far from 1, task vectors of very different norms, "
            "zero task vectors and models that do not share the base.",
        ),
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Merge the models a YAML recipe names into OUTPUT."""
    from alloykit import _output
    from alloykit.errors import AlloyError
    from alloykit.pipeline import MergeOptions, plan_stages
    from alloykit.pipeline import merge as run_merge

    _output.setup_logging(quiet)
    if precision not in ("float32", "float64"):
        raise AlloyError(f"--precision '{precision}': use float32 or float64")
    options = MergeOptions(
        device="cuda" if cuda else device,
        seed=seed,
        threads=threads,
        out_shard_size=out_shard_size,
        copy_tokenizer=copy_tokenizer,
        overwrite=overwrite,
        strict=strict,
        allow_crimes=allow_crimes,
        trust_remote_code=trust_remote_code,
        precision=precision,
        intermediate_dir=intermediate_dir,
        model_card=model_card,
        checks=checks,
    )
    if dry_run:
        stages = plan_stages(config, options)
        for name, plan in stages:
            if len(stages) > 1:
                _output.out.print(f"[bold]stage {name}[/]")
            _output.print_plan(plan)
        return
    with _output.MergeProgress(enabled=not quiet) as progress:
        result = run_merge(
            config, output, options, progress=progress.advance, on_plan=progress.start
        )
    _output.print_result(result)


INSPECT_EXAMPLES = """Examples:

\b
  alloykit inspect --base ./base ./ft-math ./ft-code      # task vectors against a base
  alloykit inspect recipe.yml                             # plus what the recipe's method keeps
  alloykit inspect recipe.yml --json stats.json --html report.html
"""


@app.command(epilog=INSPECT_EXAMPLES)
def inspect(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="CONFIG | MODEL...",
            help="A merge recipe, or with --base the fine-tuned models (folders or repo ids).",
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="The base model; the other arguments are its fine-tunes.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every figure, per layer, as JSON here.")
    ] = None,
    html_path: Annotated[
        Path | None,
        typer.Option("--html", help="Write a self-contained HTML report with plots here."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Recipes with random methods (DARE, DELLA): the draws' seed.")
    ] = 0,
    device: Annotated[
        str, typer.Option(help="Recipes: where the method runs: cpu, cuda or auto.")
    ] = "cpu",
    precision: Annotated[
        str, typer.Option(help="Recipes: the method's working precision, float32 or float64.")
    ] = "float32",
    allow_crimes: Annotated[
        bool, typer.Option("--allow-crimes", help="Recipes: allow different architectures.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Show how fine-tunes differ from their base and from each other, per layer.

    Task-vector norms, pairwise cosines, sign conflicts, concentration and a shared-base check;
    with a recipe also how much of each task vector the method keeps and its interference.
    Reads one tensor of every model at a time.
    """
    from alloykit import _output
    from alloykit.errors import AlloyError
    from alloykit.inspect.collect import inspect_config, inspect_models
    from alloykit.inspect.summary import summarize, to_json

    _output.setup_logging(quiet)
    if precision not in ("float32", "float64"):
        raise AlloyError(f"--precision '{precision}': use float32 or float64")
    for path in (json_path, html_path):  # fail before the long read, not after it
        if path is not None and not path.absolute().parent.is_dir():
            raise AlloyError(f"cannot write '{path}': folder '{path.parent}' does not exist")
    inputs = inputs or []
    if base is not None:
        inspection = inspect_models(base, inputs)
    elif len(inputs) != 1:
        raise AlloyError(
            "inspect: give one recipe (alloykit inspect recipe.yml), or the base with --base and "
            "the fine-tunes (alloykit inspect --base BASE MODEL ...)"
        )
    elif Path(inputs[0]).is_dir():
        raise AlloyError(
            f"inspect: '{inputs[0]}' is a folder, not a recipe; to inspect models pass their "
            "base with --base (alloykit inspect --base BASE MODEL ...)"
        )
    else:
        inspection = inspect_config(
            inputs[0], seed=seed, precision=precision, device=device, allow_crimes=allow_crimes
        )
    if json_path is not None:
        _output.write_json(json_path, to_json(inspection))
    if html_path is not None:
        from alloykit.inspect.report import write_report

        write_report(inspection, html_path)
    _output.print_summary(summarize(inspection), json_path, html_path)


@app.command()
def methods(
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="A method name for its details.")
    ] = None,
) -> None:
    """List the merge methods, or show one method's formula, parameters and paper."""
    from alloykit import _output
    from alloykit.methods import METHODS, get_method
    from alloykit.methods.registry import PROPERTIES

    if name is None:
        width = max(len(n) for n in METHODS)
        for method in METHODS.values():
            _output.out.print(f"{method.name:<{width}}  {method.summary}")
        return
    method = get_method(name)
    _output.out.print(f"[bold]{method.name}[/]: {method.summary}\n")
    _output.out.print(f"  {method.formula}\n")
    base = {"required": "required", "optional": "optional", "input": "an ordinary input"}
    _output.out.print(f"  base_model: {base[method.base]}")
    most = "" if method.max_models is None else f", at most {method.max_models}"
    _output.out.print(f"  models besides the base: at least {method.min_models}{most}")
    holds = ", ".join(p for p in PROPERTIES if p in method.properties) or "none"
    _output.out.print(f"  properties: {holds} (docs/methods.md says what each means)\n")
    width = max((len(p.name) for p in method.params), default=0)
    for param in method.params:
        scope = "per model" if param.per_model else "global"
        default = "required" if param.required else f"default {param.default}"
        _output.out.print(f"  {param.name:<{width}} {scope:<9} {default:<16} {param.doc}")
    _output.out.print(f"\n  {method.citation}")


@app.command()
def example(
    folder: Annotated[
        Path,
        typer.Argument(metavar="FOLDER", help="Where to put the example models and the merge."),
    ] = Path("alloykit-example"),
    method: Annotated[
        str, typer.Option(help="Bundled recipe to run: task_arithmetic or linear.")
    ] = "task_arithmetic",
    quiet: QuietOpt = False,
) -> None:
    """Build small example models (a base and two fine-tunes) and merge them.

    Writes FOLDER/models/{base,ft1,ft2}, the recipe FOLDER/<method>.yml and the merged model
    FOLDER/merged, then loads the result with transformers to show it is a working model.
    """
    from alloykit import _output
    from alloykit._example import run_example

    _output.setup_logging(quiet)
    run_example(folder, method, quiet=quiet)


def main() -> None:
    """Entry point: run the app behind one error boundary."""
    import click

    from alloykit.errors import AlloyError

    debug = bool(os.environ.get("ALLOYKIT_DEBUG"))
    try:
        code = app(prog_name="alloykit", standalone_mode=False)
    except AlloyError as e:
        if debug:
            raise
        from alloykit import _output

        _output.error(str(e))
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: one line, and how to see more
        if debug:
            raise
        from alloykit import _output

        _output.error(
            f"internal error: {type(e).__name__}: {e} (set ALLOYKIT_DEBUG=1 for the traceback)"
        )
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
