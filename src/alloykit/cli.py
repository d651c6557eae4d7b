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
  alloykit merge recipe.yml merged/ --ray local --ray-workers 4  # shards as Ray tasks
  alloykit merge recipe.yml /shared/merged/ --ray auto           # on a Ray cluster
"""

EVALUATE_EXAMPLES = """Examples:

\b
  alloykit evaluate merged/ --task arith.yml                     # a model folder (or repo id)
  alloykit evaluate recipe.yml --task arith.yml --task ppl.yml   # merged in memory, nothing written
  alloykit evaluate merged/ --task arith.yml --output scores.json --device auto --batch-size 8
  alloykit evaluate --compare base/ ft1/ ft2/ recipe.yml --task t1.yml --task t2.yml --plot bars.png
  alloykit evaluate merged/ --harness-task hellaswag --limit 100  # lm-evaluation-harness (extra 'eval')
"""

SEARCH_EXAMPLES = """Examples:

\b
  alloykit search search.yml runs/s1                       # the file's optimiser and budget
  alloykit search pareto.yml runs/p1     # objective.pareto: true: a Pareto front, pareto/*.yml
  alloykit search layers.yml runs/l1     # layer_path: a passthrough recipe, best.yml
  alloykit search search.yml runs/s1 --budget 60 --time-limit 3600 --device auto
  alloykit search search.yml runs/s1 --resume              # continue after a kill
  alloykit search search.yml runs/s2 --seed 1 --save-model # also write the best merge
  alloykit merge runs/s1/best.yml merged/                  # merge the best recipe later
  alloykit search search.yml runs/s3 --ray local --ray-workers 4   # 4 Ray actors score
  alloykit search search.yml /shared/runs/s4 --ray auto    # the actors of a Ray cluster
"""

from alloykit._cli_options import (  # noqa: E402
    CopyTokenizerOpt,
    OverwriteOpt,
    QuietOpt,
    RayOpt,
    RayWorkersOpt,
    ShardSizeOpt,
)


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
    out_shard_size: ShardSizeOpt = "5B",
    copy_tokenizer: CopyTokenizerOpt = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan (tensor, inputs, method, parameters) and stop."
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
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
    hash_inputs: Annotated[
        bool,
        typer.Option(
            "--hash-inputs",
            help="List the sha256 of local input files in the model card (reads every input "
            "once more; Hub inputs' hashes are free and always listed).",
        ),
    ] = False,
    checks: Annotated[
        bool,
        typer.Option(
            "--checks/--no-checks",
            help="Warn about coefficients far from 1, task vectors of very different norms, "
            "zero task vectors and models that do not share the base.",
        ),
    ] = True,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = None,
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
        hash_inputs=hash_inputs,
        checks=checks,
    )
    if dry_run:
        stages = plan_stages(config, options)
        for name, plan in stages:
            if len(stages) > 1:
                _output.out.print(f"[bold]stage {name}[/]")
            _output.print_plan(plan)
        return
    runner = None
    if ray is not None:
        from alloykit.distributed import require_ray
        from alloykit.distributed.merge import ray_shard_runner

        require_ray()
        runner = ray_shard_runner(ray, ray_workers)
    with _output.MergeProgress(enabled=not quiet) as progress:
        result = run_merge(
            config,
            output,
            options,
            progress=progress.advance,
            on_plan=progress.start,
            shard_runner=runner,
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


ALIGN_EXAMPLES = """Examples:

\b
  alloykit align --reference a/ b/ b-aligned/           # permute b's units to match a
  alloykit align --reference a.pt b.pt mid/ --interpolate 0.5   # write the aligned midpoint
  alloykit align --merge-many m1/ m2/ m3/ merged/       # MergeMany: align all, write the mean
  alloykit align --reference a/ b/ out/ --spec resnet.yml      # a declared permutation spec
  alloykit align a/ --print-spec > spec.yml            # the inferred spec, to edit for --spec
  alloykit align --merge-many m1.pt m2.pt out/ --calibration x.pt --module net.py:build --repair
"""


@app.command(epilog=ALIGN_EXAMPLES)
def align(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL... OUTPUT",
            help="The model(s) to align, then the output folder.",
            show_default=False,
        ),
    ],
    reference: Annotated[
        Path | None,
        typer.Option(help="Align MODEL to this model (weight matching); writes MODEL permuted."),
    ] = None,
    merge_many: Annotated[
        bool,
        typer.Option("--merge-many", help="Align all MODELs to each other; write their mean."),
    ] = False,
    spec: Annotated[
        Path | None,
        typer.Option(help="YAML permutation spec (default: inferred; see docs/rebasin.md)."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for the order groups and models are visited.")
    ] = 0,
    max_iter: Annotated[
        int, typer.Option(help="Most rounds of coordinate descent (MergeMany: of rounds).")
    ] = 100,
    interpolate: Annotated[
        float | None,
        typer.Option(
            help="With --reference: write (1-t)*REFERENCE + t*aligned MODEL instead of the aligned MODEL."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Inputs (.pt/.safetensors tensor) for resetting BatchNorm statistics of the merge."
        ),
    ] = None,
    module: Annotated[
        str | None,
        typer.Option(help="FILE.py:FUNCTION returning the torch module (needed by --calibration)."),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="REPAIR the merge's unit statistics (needs --calibration)."),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Calibration batch size.")] = 256,
    print_spec: Annotated[
        bool,
        typer.Option(
            "--print-spec",
            help="Print the permutation spec of the first model as YAML (to edit for --spec) and stop.",
        ),
    ] = False,
    out_shard_size: ShardSizeOpt = "5B",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Permute hidden units of models trained from different initialisations so they match (Git Re-Basin).

    Weight matching (Ainsworth et al. 2023, arXiv:2209.04836) finds, for each group of
    interchangeable units (MLP hidden units, conv channels, attention heads), the permutation
    that best matches the reference model's weights. The permuted model computes the same
    function; averaging it with the reference then works far better than averaging directly.
    """
    from alloykit.errors import AlloyError

    if print_spec:
        from alloykit.rebasin.align import describe_spec
        from alloykit.rebasin.spec import spec_to_yaml

        typer.echo(spec_to_yaml(describe_spec(reference or paths[0], spec)), nl=False)
        return
    if (reference is None) == (not merge_many):
        raise AlloyError("give exactly one of --reference MODEL and --merge-many")
    if reference is not None and len(paths) != 2:
        raise AlloyError(f"--reference takes MODEL OUTPUT, got {len(paths)} paths")
    if merge_many and len(paths) < 3:
        raise AlloyError("--merge-many takes at least two models and OUTPUT")
    if merge_many and interpolate is not None:
        raise AlloyError("--interpolate goes with --reference; --merge-many writes the mean")
    # flags are checked before torch is imported, so a mistyped command fails at once
    from alloykit import _output
    from alloykit.rebasin.align import AlignOptions, align_many
    from alloykit.rebasin.align import align as run_align

    _output.setup_logging(quiet)
    options = AlignOptions(
        seed=seed,
        max_iter=max_iter,
        spec=spec,
        interpolate=interpolate,
        calibration=calibration,
        module=module,
        repair=repair,
        batch_size=batch_size,
        overwrite=overwrite,
        out_shard_size=out_shard_size,
    )
    *models, output = paths
    if reference is not None:
        result = run_align(reference, models[0], output, options)
    else:
        result = align_many(models, output, options)
    _output.print_alignment(result)


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
    out_shard_size: ShardSizeOpt = "5B",
    copy_tokenizer: CopyTokenizerOpt = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the output architecture and each tensor's source, and stop."
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
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


@app.command(epilog=SEARCH_EXAMPLES)
def search(
    search_file: Annotated[
        Path, typer.Argument(metavar="SEARCH", help="Search file (YAML; docs/search.md).")
    ],
    out: Annotated[
        Path,
        typer.Argument(metavar="OUT", help="Folder for the study, best.yml, trials.csv, plots."),
    ],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the study in OUT after a kill.")
    ] = False,
    budget: Annotated[
        int | None, typer.Option(min=1, help="Candidates to evaluate (overrides the file).")
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(min=1, help="Seconds after which no new candidate starts."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the search (overrides the file).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option("--threads", "-j", min=1, help="CPU threads for torch.")
    ] = None,
    save_model: Annotated[
        bool, typer.Option("--save-model", help="Also merge the best recipe into OUT/model.")
    ] = False,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Search merge recipes (CMA-ES, TPE, GP, random, greedy soup) on validation splits.

    With objective.pareto: true, each task is one objective and the result a Pareto front
    (NSGA-II, NSGA-III, TPE, random); with a layer_path: section, the layers of a passthrough
    merge are searched (Akiba et al. 2024). See docs/search.md.
    """
    from dataclasses import replace

    from alloykit import _output
    from alloykit.search.study import SearchOptions, Trial, require_libraries, run_search

    _output.setup_logging(quiet)
    require_libraries()
    from alloykit._cli_search import dispatch

    special = SearchOptions(device=device, budget=budget, time_limit=time_limit, seed=seed)
    special = replace(special, resume=resume, save_model=save_model, threads=threads)
    if dispatch(search_file, out, special, quiet=quiet):  # a Pareto or a layer-path search
        return
    best: list[float] = []

    def report(trial: Trial, total: int) -> None:
        if quiet:
            return
        outcome = trial.outcome
        if outcome is None:
            _output.out.print(f"  trial {trial.slot + 1}/{total}  failed: {trial.error}")
            return
        if outcome.feasible and (not best or outcome.score > best[0]):
            best[:] = [outcome.score]
        flag = "" if outcome.feasible else "  (infeasible)"
        shown = f"{best[0]:.4f}" if best else "-"
        _output.out.print(
            f"  trial {trial.slot + 1}/{total}  score {outcome.score:.4f}{flag}  best {shown}"
            f"  ({trial.seconds:.2f}s)"
        )

    options = SearchOptions(
        device=device,
        budget=budget,
        time_limit=time_limit,
        seed=seed,
        resume=resume,
        save_model=save_model,
        threads=threads,
        ray=ray,
        ray_workers=ray_workers,
    )
    result = run_search(search_file, out, options, on_trial=report)
    if result.best is None or result.best.outcome is None:
        _output.out.print(f"no feasible candidate in {len(result.trials)} trials; see {out}")
    else:
        line = f"best: trial {result.best.slot}, validation {result.best.outcome.score:.4f}"
        if result.test is not None:
            line += f", test {result.test.score:.4f}"
        _output.out.print(line)
    _output.out.print(
        f"  {len(result.trials)} trials, {result.candidates_per_minute:.1f} candidates/minute; "
        f"wrote {', '.join(result.files)} in {out}"
    )


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
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads, and experts fine-tuned at a time (default: up to 4)."),
    ] = None,
) -> None:
    """Merge real fine-tunes of a real model and score each merge on every task.

    Fine-tunes all-MiniLM-L6-v2 once per task (text classification on data shipped in PyPI
    packages; needs the 'demo' extra), caches the experts, merges their backbones with linear,
    task_arithmetic, ties and tsv (hyper-parameters chosen on validation), prints accuracy and
    normalised accuracy per task on test, and writes a bar chart. The first run fine-tunes four
    experts (about 10 CPU-minutes, one thread each, as many at a time as --threads; 8 minutes
    in all on 2 cores); later runs reuse the experts, the validation scores and the experts'
    and probe's test scores, so each method is merged and scored once (under a minute).

    Examples:
        alloykit demo
        alloykit demo --threads 2 --plot bars.png --cache /tmp/demo-cache
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
