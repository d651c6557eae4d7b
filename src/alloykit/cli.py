"""The ``alloykit`` command: wiring only; each command is a thin layer over a library call.

Errors from alloykit (:class:`~alloykit.errors.AlloyError`) are printed as one line with a
non-zero exit; set ``ALLOYKIT_DEBUG=1`` for the full traceback. Heavy imports (torch,
transformers) happen inside commands so ``alloykit --help`` starts fast.
"""

from __future__ import annotations

import json
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

EVALUATE_EXAMPLES = """Examples:

\b
  alloykit evaluate merged/ --task arith.yml                     # a model folder (or repo id)
  alloykit evaluate recipe.yml --task arith.yml --task ppl.yml   # merged in memory, nothing written
  alloykit evaluate merged/ --task arith.yml --output scores.json --device auto --batch-size 8
  alloykit evaluate --compare base/ ft1/ ft2/ recipe.yml --task t1.yml --task t2.yml --plot bars.png
  alloykit evaluate merged/ --harness-task hellaswag --limit 100  # lm-evaluation-harness (extra 'eval')
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


MOE_EXAMPLES = """Examples:

\b
  alloykit moe moe.yml moe-model/                     # hidden-state gates, computed on the CPU
  alloykit moe moe.yml moe-model/ --seed 0            # random gates, reproducible
  alloykit moe moe.yml moe-model/ --dry-run           # each output tensor and its source
  alloykit moe moe.yml moe-model/ --device auto --overwrite
  alloykit moe moe-model/alloykit_moe_config.yml again/   # re-run a recipe written by a build

\b
moe.yml (mergekit-moe's format; docs/moe.md has every key):
  base_model: ./base
  gate_mode: hidden          # hidden | cheap_embed | random | uniform_random
  experts_per_token: 2
  experts:
    - source_model: ./math
      positive_prompts: ["solve the equation"]
    - source_model: ./code
      positive_prompts: ["write a python function"]
"""


@app.command(epilog=MOE_EXAMPLES)
def moe(
    config: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="MoE recipe (mergekit-moe YAML).")
    ],
    output: Annotated[
        Path,
        typer.Argument(metavar="OUTPUT", help="Output folder; created when the build is complete."),
    ],
    device: Annotated[
        str, typer.Option(help="Where hidden-state gates run the base model: cpu, cuda or auto.")
    ] = "cpu",
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            "--random-seed",
            help="Seed for random gates and noise; same seed, same model.",
        ),
    ] = None,
    out_shard_size: Annotated[
        str, typer.Option(help="Largest output shard: 5B = 5x10^9 bytes, 500MB, 2GiB.")
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
            "--dry-run", help="Print the output architecture and each tensor's source, and stop."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE) from dense experts."""
    from alloykit import _output
    from alloykit.moe import MoEOptions, build_moe, plan_moe

    _output.setup_logging(quiet)
    options = MoEOptions(
        device=device,
        seed=seed,
        out_shard_size=out_shard_size,
        copy_tokenizer=copy_tokenizer,
        overwrite=overwrite,
    )
    if dry_run:
        plan = plan_moe(config)
        _output.print_rows([("output tensor", "shape", "source"), *plan.rows()])
        dtype = str(plan.dtype).removeprefix("torch.")
        _output.out.print(
            f"[bold]total:[/] {len(plan.pieces)} tensors, {plan.architecture} with "
            f"{len(plan.experts)} experts, gate_mode {plan.gate_mode}, {dtype}"
        )
        return
    result = build_moe(config, output, options)
    _output.out.print(
        f"wrote {result.output} ({result.architecture}, {result.experts} experts, "
        f"{result.experts_per_token} per token) in {result.seconds:.1f} s"
    )


from alloykit._cli_lora import lora_app  # noqa: E402 (a sub-app: wiring, no heavy imports)

app.add_typer(lora_app, name="lora")


@app.command(epilog=EVALUATE_EXAMPLES)
def evaluate(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL_OR_CONFIG...",
            help="A model folder or repo id, or a merge recipe (.yml, merged in memory). "
            "Several with --compare.",
        ),
    ],
    task: Annotated[
        list[Path] | None,
        typer.Option("--task", "-t", help="A task file (YAML; docs/evaluate.md). Repeatable."),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Evaluate several models: one table, scores normalised by each "
            "task's own fine-tune.",
        ),
    ] = False,
    finetune: Annotated[
        list[str] | None,
        typer.Option(
            "--finetune",
            help="TASK=MODEL: the fine-tune that TASK's scores are normalised by "
            "(overrides the task file). Repeatable.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    batch_size: Annotated[
        str, typer.Option(help="Sequences per forward pass, or auto (halved on out-of-memory).")
    ] = "auto",
    dtype: Annotated[
        str | None,
        typer.Option(help="float32, bfloat16 or float16 (default: the model's own)."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(min=2, help="Longest sequence fed to the model.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "-j", min=1, help="CPU threads for torch.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of merge methods that sample (merge recipes only).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the results as JSON here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="With --compare: write a bar chart PNG here.")
    ] = None,
    harness_task: Annotated[
        list[str] | None,
        typer.Option(
            "--harness-task", help="An lm-evaluation-harness task name (needs the 'eval' extra)."
        ),
    ] = None,
    harness_include: Annotated[
        Path | None,
        typer.Option(help="A folder of extra lm-evaluation-harness task YAMLs."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="lm-evaluation-harness: items per task.")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Score models or merge recipes on task files (and lm-evaluation-harness tasks)."""
    from alloykit import _output
    from alloykit.errors import AlloyError

    _output.setup_logging(quiet)
    if not task and not harness_task:
        raise AlloyError("evaluate needs at least one --task FILE (or --harness-task NAME)")
    if len(models) > 1 and not compare:
        raise AlloyError(f"{len(models)} models given: pass --compare to evaluate several")
    if plot is not None and not compare:
        raise AlloyError("--plot draws the --compare table: pass --compare")
    if finetune and not compare:
        raise AlloyError("--finetune sets what --compare normalises by: pass --compare")
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise AlloyError(f"--batch-size '{batch_size}': use a positive number or auto")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise AlloyError(f"--dtype '{dtype}': use float32, bfloat16 or float16")
    finetunes = {}
    for item in finetune or []:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise AlloyError(f"--finetune '{item}': use TASK=MODEL")
        finetunes[name] = model
    from alloykit.evaluation import EvalOptions
    from alloykit.pipeline import MergeOptions

    options = EvalOptions(
        device=device,
        batch_size=None if batch_size == "auto" else int(batch_size),
        dtype=dtype,
        max_length=max_length,
        threads=threads,
        merge=MergeOptions(device=device, seed=seed, threads=threads),
    )
    with _output.EvalProgress(enabled=not quiet) as progress:
        if harness_task:
            from alloykit.evaluation.harness import run_harness

            if compare or task:
                raise AlloyError("--harness-task runs alone: one model, no --task, no --compare")
            scores = run_harness(
                models[0], harness_task, options, limit=limit, include=harness_include
            )
            _output.out.print_json(json.dumps(scores, default=str))
            if output is not None:
                output.write_text(json.dumps(scores, indent=2, default=str) + "\n")
            return
        tasks = list(task or [])
        if compare:
            from alloykit.evaluation.compare import bar_chart
            from alloykit.evaluation.compare import compare as run_compare

            table = run_compare(models, tasks, options, finetunes=finetunes, progress=progress)
            text = table.to_json()
        else:
            from alloykit.evaluation import evaluate as run_evaluate

            results = run_evaluate(models[0], tasks, options, progress=progress)
            text = results.to_json()
    if compare:
        _output.print_comparison(table)
        if plot is not None:
            _output.out.print(f"  bar chart: {bar_chart(table, plot)}")
    else:
        _output.print_results(results)
    if output is not None:
        output.write_text(text + "\n")
        _output.out.print(f"  results: {output}")


@app.command()
def demo(
    plot: Annotated[Path, typer.Option(help="Where to write the bar chart (PNG).")] = Path(
        "alloykit-demo.png"
    ),
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Experts cache (default: $ALLOYKIT_CACHE/demo or ~/.cache/alloykit/demo)."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: up to 4).")] = None,
) -> None:
    """Merge real fine-tunes of a real model and score each merge on every task.

    Fine-tunes all-MiniLM-L6-v2 once per task (text classification on data shipped in PyPI
    packages; needs the 'demo' extra), caches the experts, merges their backbones with linear,
    task_arithmetic, ties and tsv (hyper-parameters chosen on validation), prints accuracy and
    normalised accuracy per task on test, and writes a bar chart. First run: minutes; cached: seconds.
    """
    from alloykit.demo import run_demo
    from alloykit.demo.experiment import format_table

    table, chart = run_demo(cache, plot, threads, log=lambda s: typer.echo(s, err=True))
    typer.echo(format_table(table))
    typer.echo(f"\nbar chart: {chart}   ({table.seconds['total']:.0f} s)")


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
