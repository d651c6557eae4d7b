"""The model card (``README.md``) every merged model folder gets.

Hugging Face reads its YAML front matter (``base_model``, ``tags``, ``library_name``); people
read the rest: the method and its paper, the inputs with their revisions and hashes, the
recipe that reproduces the merge, the alloykit version and the warnings the merge gave.

Input hashes are the sha256 of each weight file. A Hub input's come free: the cache names each
file's blob by its sha256 (the Hub's LFS hash). Local files are hashed only when asked
(``hash_inputs``, ``--hash-inputs``: reading every input again costs about 40% of a linear
merge's time on a 2-core machine), in a background thread
while the merge runs (:class:`InputHashes`), so the cost hides behind the merge's arithmetic
where it can; ``--no-model-card`` skips it.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from alloykit.config import MergeConfig, model_refs
from alloykit.io.checkpoint import Checkpoint

CARD_FILE = "README.md"
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Hashing reads through one reused buffer of this size: the merge's memory bound leaves room
# for about one tensor's working set, so the hash thread must not hold more than a few MB.
_CHUNK = 1 << 18


@dataclass(frozen=True)
class InputRecord:
    """One input model as the card lists it."""

    reference: str  # as the recipe names it
    role: str  # base, input
    revision: str  # the requested revision, the Hub snapshot's commit, or "local"
    files: tuple[tuple[str, str], ...]  # (weight file name, sha256), see the module docstring


def input_records(
    config: MergeConfig,
    checkpoints: Mapping[str, Checkpoint],
    hashes: Mapping[Path, str] | None = None,
    hash_local: bool = True,
) -> list[InputRecord]:
    """The final stage's inputs, base first, with revisions and sha256 (from ``hashes`` when
    given, see :class:`InputHashes`; a local file not in ``hashes`` is read and hashed only
    with ``hash_local``, else its digest is ``NOT_HASHED``)."""
    hashes = hashes or {}
    base = str(config.base_model) if config.base_model else None
    records = []
    for ref in model_refs(config):
        label = str(ref)
        checkpoint = checkpoints.get(label)
        role = "base" if label == base else "input"
        files = weight_files(checkpoint) if checkpoint is not None else []
        if checkpoint is None or not files:  # an earlier stage's result, in memory
            records.append(InputRecord(label, role, ref.revision or "-", ()))
            continue
        snapshot = _SNAPSHOT.search(str(Path(checkpoint.folder).absolute()))
        revision = ref.revision or (snapshot[1] if snapshot else "local")
        digests = tuple(
            (file.name, hashes.get(file) or file_sha256(file, local=hash_local)) for file in files
        )
        records.append(InputRecord(label, role, revision, digests))
    records.sort(key=lambda r: r.role != "base")
    return records


def weight_files(checkpoint: Checkpoint) -> list[Path]:
    """The files a checkpoint's tensors are stored in (none for an in-memory result)."""
    files = sorted({info.file for info in checkpoint.tensors.values()})
    return [file for file in files if file.is_file()]


NOT_HASHED = "not hashed (local file; merge with --hash-inputs)"


def file_sha256(file: Path, stop: threading.Event | None = None, *, local: bool = True) -> str:
    """sha256 of a file: the blob's name in the Hugging Face cache, else read and hashed
    (``""`` when ``stop`` is set before the end; ``NOT_HASHED`` without ``local``)."""
    target = file.resolve()
    if target.parent.name == "blobs" and _SHA256.match(target.name):
        return target.name
    if not local:
        return NOT_HASHED
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with target.open("rb", buffering=0) as handle:
        while got := handle.readinto(buffer):
            if stop is not None and stop.is_set():
                return ""
            digest.update(view[:got])  # hashlib releases the GIL for large buffers
    return digest.hexdigest()


class InputHashes:
    """Hashes the input weight files in a background thread while the merge runs.

    Use as a context manager around the merge; :meth:`result` waits for the hashes. Leaving the
    block (an error included) stops the thread at its next chunk.
    """

    def __init__(self, checkpoints: Mapping[str, Checkpoint]) -> None:
        files = {file for checkpoint in checkpoints.values() for file in weight_files(checkpoint)}
        self._files = sorted(files)
        self._hashes: dict[Path, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alloykit-hash", daemon=True)

    def _run(self) -> None:
        for file in self._files:
            self._hashes[file] = file_sha256(file, self._stop)

    def __enter__(self) -> InputHashes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[Path, str]:
        """``{weight file: sha256}``, once every file is hashed."""
        self._thread.join()
        return dict(self._hashes)


def render_card(
    *,
    name: str,
    inputs: Sequence[InputRecord],
    method: str,
    summary: str,
    citation: str,
    recipe: str,
    recipe_hash: str,
    warnings: Sequence[str],
    version: str,
) -> str:
    """The card's text: YAML front matter, then Markdown."""
    base_models = [r.reference for r in inputs if r.role == "base"] or [r.reference for r in inputs]
    front = {
        "base_model": base_models[0] if len(base_models) == 1 else base_models,
        "tags": ["merge", "alloykit"],
        "library_name": "transformers",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {name}", ""]
    lines += [
        f"This model is a merge of pre-trained language models made with alloykit {version} "
        f"using the **{method}** method: {summary}.",
        "",
        "## Method",
        "",
        f"`{method}`: {citation}",
        "",
        "## Inputs",
        "",
        "| model | role | revision | weight file | sha256 |",
        "|---|---|---|---|---|",
    ]
    for record in inputs:
        for number, (file, sha) in enumerate(record.files or (("-", "-"),)):
            model = f"`{record.reference}` | {record.role} | `{record.revision}`"
            lines.append(f"| {model if number == 0 else ' | | '} | {file} | `{sha}` |")
    lines += [
        "",
        "## Recipe",
        "",
        f"Recipe hash `{recipe_hash[:16]}`. Run it again with "
        "`alloykit merge alloykit_config.yml OUTPUT`:",
        "",
        "```yaml",
        recipe.rstrip(),
        "```",
        "",
    ]
    if warnings:
        lines += ["## Warnings", "", "The merge gave these warnings:", ""]
        lines += [f"- {w}" for w in warnings]
        lines.append("")
    return "\n".join(lines)
