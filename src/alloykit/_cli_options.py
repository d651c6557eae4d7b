"""Command-line options shared by several ``alloykit`` commands (one help text each)."""

from __future__ import annotations

from typing import Annotated

import typer

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")
]
ShardSizeOpt = Annotated[
    str,
    typer.Option(
        "--out-shard-size",
        help="Largest output shard in bytes: 5B = 5x10^9 (MergeKit's meaning), 500MB, 2GiB.",
    ),
]
CopyTokenizerOpt = Annotated[
    bool,
    typer.Option(
        "--copy-tokenizer/--no-copy-tokenizer", help="Copy the base model's tokenizer files."
    ),
]

# --ray ADDRESS (merge and search): local, auto, HOST:PORT or ray://HOST:PORT; docs/distributed.md
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run on Ray: 'local' starts a Ray instance here; 'auto', HOST:PORT or "
        "ray://HOST:PORT joins a cluster (pip install 'alloykit[distributed]').",
    ),
]
RayWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--ray-workers", min=1, help="With --ray local: worker CPUs (default: all of them)."
    ),
]
