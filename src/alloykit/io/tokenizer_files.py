"""Tokenizer files: reading a model's vocabulary, writing the merged tokenizer, chat templates.

A model's tokenizer is read from its ``tokenizer.json`` (the fast tokenizer's full
description); a model that ships only slow files (``tokenizer.model``, ``vocab.txt``) is
converted by ``transformers``. The output tokenizer is the tokenizer source's ``tokenizer.json``
with its vocabulary replaced by the output's token -> id map: every output token is written
into the model's vocabulary at its id (added tokens too, so the fast tokenizer resolves them
to exactly those ids), the added-token list and the special-token ids of the post-processor
follow, and the owner's BPE merges are kept (those whose tokens all stay), so text encodes
as with the owner's tokenizer; other models' new regular tokens decode but are not produced by
encoding (their added and special tokens are, as added tokens). The written folder is then
loaded back with ``AutoTokenizer`` and its map compared with the planned one, so a tokenizer
that would not load with the aligned ids is never written.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alloykit.errors import CheckpointError, IncompatibleModels, MergeError
from alloykit.tokenizer import OutputTokenizer, Vocabulary, VocabularyPlan

log = logging.getLogger("alloykit")

# Token-id keys of config.json / generation_config.json that name special tokens.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# Vocabulary files of slow tokenizers: stale once tokenizer.json describes another vocabulary.
# The Unigram score of a piece the tokenizer source lacks: far below any real log-probability.
UNUSED_PIECE_SCORE = -1e9
SLOW_FILES = (
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
)


def read_tokenizer_document(folder: Path, label: str) -> dict[str, Any]:
    """Model ``label``'s fast tokenizer as data (``tokenizer.json``, or converted slow files)."""
    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            document: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"model '{label}': '{file}' is not valid JSON ({e})") from e
        return document
    if folder.is_dir() and any((folder / name).is_file() for name in SLOW_FILES):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            converted: dict[str, Any] = json.loads(tokenizer.backend_tokenizer.to_str())
            return converted
        except Exception as e:  # any conversion failure means the same thing
            raise CheckpointError(
                f"model '{label}': its tokenizer in '{folder}' could not be converted to a "
                f"fast tokenizer ({type(e).__name__}: {e}); add a tokenizer.json"
            ) from e
    raise CheckpointError(
        f"model '{label}' has no tokenizer files in '{folder}' (tokenizer.json, "
        "tokenizer.model, vocab.json...), which building the output vocabulary needs; copy its "
        "tokenizer files into the folder"
    )


def document_vocabulary(document: Mapping[str, Any], label: str, rows: int) -> Vocabulary:
    """The rows of a tokenizer document: tokens with an id below ``rows``, and its added tokens."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(json.dumps(document))
    except Exception as e:  # the tokenizers library raises plain Exception
        raise CheckpointError(f"model '{label}': its tokenizer does not load ({e})") from e
    ids = tokenizer.get_vocab(with_added_tokens=True)
    tokens = {token: i for token, i in ids.items() if i < rows}
    added = {
        entry["content"]: {k: v for k, v in entry.items() if k not in ("id", "content")}
        for entry in document.get("added_tokens") or []
    }
    dropped = len(ids) - len(tokens)
    if dropped:
        log.info(f"model '{label}': {dropped} tokenizer entries past its {rows} rows are ignored")
    return Vocabulary(label, tokens, rows, added)


# --------------------------------------------------------------------------- the output document


def _pairs(merges: Sequence[Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


def build_document(
    owner: Mapping[str, Any],
    plan: VocabularyPlan,
    owner_label: str,
) -> dict[str, Any]:
    """The output ``tokenizer.json``: ``owner``'s tokenizer over the plan's vocabulary.

    A BPE keeps only ``owner``'s merges and a Unigram gives ``owner``'s pieces their scores and
    new pieces :data:`UNUSED_PIECE_SCORE`, so both encode text as ``owner`` does; WordPiece and
    WordLevel match words against the whole vocabulary, so they may produce new tokens too.
    """
    document = copy.deepcopy(dict(owner))
    model = document.get("model") or {}
    kind = model.get("type")
    ids = plan.token_ids()
    if kind in ("BPE", "WordLevel", "WordPiece"):
        model["vocab"] = dict(ids)
        if kind == "BPE":
            # the owner's merges only: text encodes exactly as with the owner's tokenizer, and
            # other models' new tokens decode but are not produced by encoding
            merges = _pairs(model.get("merges") or [])
            kept = [m for m in merges if m[0] in ids and m[1] in ids and m[0] + m[1] in ids]
            strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
            model["merges"] = [f"{a} {b}" if strings else [a, b] for a, b in kept]
    elif kind == "Unigram":
        scores = {piece: score for piece, score in model.get("vocab") or []}
        unk = model.get("unk_id")
        unk_piece = model["vocab"][unk][0] if isinstance(unk, int) else None
        # a piece the owner lacks gets a score no segmentation prefers, so text encodes as
        # with the owner's tokenizer (added tokens are matched before segmentation anyway)
        owner_pieces = {piece for piece, _ in model["vocab"]}
        model["vocab"] = [
            [token, scores.get(token, 0.0) if token in owner_pieces else UNUSED_PIECE_SCORE]
            for token in plan.tokens
        ]
        if unk_piece is not None:
            model["unk_id"] = ids[unk_piece]
    else:
        raise IncompatibleModels(
            f"model '{owner_label}': its tokenizer model is {kind!r}, which alloykit cannot "
            "rebuild with another vocabulary (BPE, WordLevel, WordPiece and Unigram are "
            "supported); use a tokenizer source whose vocabulary needs no change"
        )
    document["model"] = model
    document["added_tokens"] = [
        {"id": ids[content], "content": content, **entry}
        for content, entry in sorted(plan.added.items(), key=lambda item: ids[item[0]])
    ]
    if document.get("post_processor"):
        document["post_processor"] = _renumber_processor(document["post_processor"], ids)
    padding = document.get("padding")
    if isinstance(padding, dict) and padding.get("pad_token") in ids:
        padding["pad_id"] = ids[padding["pad_token"]]
    return document


def _renumber_processor(processor: Any, ids: Mapping[str, int]) -> Any:
    """A post-processor with its special tokens' ids taken from ``ids``."""
    if not isinstance(processor, dict):
        return processor
    processor = dict(processor)
    for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
        value = processor.get(key)
        if isinstance(value, list) and len(value) == 2 and value[0] in ids:
            processor[key] = [value[0], ids[value[0]]]
    specials = processor.get("special_tokens")
    if isinstance(specials, dict):
        processor["special_tokens"] = {
            name: dict(
                spec, ids=[ids.get(t, i) for t, i in zip(spec["tokens"], spec["ids"], strict=True)]
            )
            if isinstance(spec, dict) and "tokens" in spec
            else spec
            for name, spec in specials.items()
        }
    if isinstance(processor.get("processors"), list):
        processor["processors"] = [_renumber_processor(p, ids) for p in processor["processors"]]
    return processor


def write_tokenizer(
    folder: Path,
    owner_folder: Path,
    document: Mapping[str, Any],
    plan: VocabularyPlan,
    chat_template: str | None,
) -> None:
    """Write the output tokenizer into ``folder`` and check that it loads with the plan's ids.

    ``tokenizer_config.json`` and ``special_tokens_map.json`` come from ``owner_folder`` (the
    tokenizer source), with the added tokens and special tokens of the output; the slow
    tokenizer's vocabulary files are not written (they would describe another vocabulary).
    """
    (folder / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False, indent=2))
    settings: dict[str, Any] = {}
    if (owner_folder / "tokenizer_config.json").is_file():
        settings = json.loads((owner_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = plan.token_ids()
    if "added_tokens_decoder" in settings:
        settings["added_tokens_decoder"] = {
            str(ids[content]): {"content": content, **entry}
            for content, entry in sorted(plan.added.items(), key=lambda item: ids[item[0]])
        }
    named = {v for k, v in settings.items() if k.endswith("_token") and isinstance(v, str)}
    key = (
        "additional_special_tokens"
        if "additional_special_tokens" in settings
        else ("extra_special_tokens")
    )
    extra = settings.get(key)
    listed = list(extra) if isinstance(extra, list) else []
    new = [
        content
        for content, entry in sorted(plan.added.items(), key=lambda item: ids[item[0]])
        if entry.get("special") and content not in named and content not in listed
    ]
    if new and (isinstance(extra, list) or extra is None):
        settings[key] = listed + new
    for stale in ("chat_template", "tokenizer_file", "vocab_file", "merges_file"):
        settings.pop(stale, None)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
    )
    if (owner_folder / "special_tokens_map.json").is_file():
        shutil.copyfile(
            owner_folder / "special_tokens_map.json", folder / "special_tokens_map.json"
        )
    template = chat_template if chat_template is not None else read_chat_template(owner_folder)
    if template is not None:
        write_chat_template(folder, template)
    check_written_tokenizer(folder, ids)


def write_output_tokenizer(
    folder: Path, tokenizer: OutputTokenizer, folders: Mapping[str, Path], donor: str
) -> None:
    """Write a planned tokenizer into ``folder``: built, or the owner's files (with the chat
    template when one is set); the donor's generation config follows the output's ids."""
    from alloykit.io.writer import TOKENIZER_FILES, copy_files

    owner = Path(folders[tokenizer.owner])
    if tokenizer.document is not None and tokenizer.vocabulary is not None:
        write_tokenizer(
            folder, owner, tokenizer.document, tokenizer.vocabulary, tokenizer.chat_template
        )
    else:
        copy_files(folder, owner, TOKENIZER_FILES)
        if tokenizer.chat_template is not None:
            write_chat_template(folder, tokenizer.chat_template)
    moves = tokenizer.id_moves(donor)
    if moves is not None:
        rewrite_generation_config(folder, *moves)


def check_written_tokenizer(folder: Path, ids: Mapping[str, int]) -> None:
    """Load ``folder``'s tokenizer with ``AutoTokenizer``; its token -> id map must be ``ids``."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    except Exception as e:  # report any loading failure the same way
        raise MergeError(f"the merged tokenizer does not load ({type(e).__name__}: {e})") from e
    if loaded != dict(ids):
        wrong = next((t for t in ids if loaded.get(t) != ids[t]), None)
        raise MergeError(
            f"the merged tokenizer loads with other ids than the aligned rows (token {wrong!r}: "
            f"{loaded.get(wrong) if wrong else None} instead of {ids.get(wrong) if wrong else None}"
            f"; {len(loaded)} vs {len(ids)} tokens); please report this tokenizer"
        )


# --------------------------------------------------------------------------- special-token ids


def remap_token_ids(
    config: dict[str, Any], old: Mapping[int, str], new: Mapping[str, int]
) -> dict[str, Any]:
    """``config`` with its special-token ids (``eos_token_id``...) moved to the output ids.

    ``old`` maps the donor's ids to tokens, ``new`` the output's tokens to ids; an id whose
    token is not in the output is left as it is. Nested ``text_config`` is handled too.
    """
    config = dict(config)

    def move(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | list):
            return value
        if isinstance(value, list):
            return [move(v) for v in value]
        token = old.get(value)
        return new.get(token, value) if token is not None else value

    for key in TOKEN_ID_KEYS:
        if key in config:
            config[key] = move(config[key])
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = remap_token_ids(config["text_config"], old, new)
    return config


def rewrite_generation_config(folder: Path, old: Mapping[int, str], new: Mapping[str, int]) -> None:
    """Move the special-token ids of ``folder/generation_config.json`` to the output ids."""
    file = folder / "generation_config.json"
    if file.is_file():
        data = json.loads(file.read_text(encoding="utf-8"))
        file.write_text(json.dumps(remap_token_ids(data, old, new), indent=2) + "\n")


# --------------------------------------------------------------------------- chat templates


def read_chat_template(folder: Path) -> str | None:
    """A model's chat template: ``chat_template.jinja``, else the tokenizer config's, else
    ``chat_template.json``'s; None when it has none (a list of named templates gives its
    ``default``)."""
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, list):
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if isinstance(value, str):
            return value
    return None


def most_common_template(folders: Mapping[str, Path]) -> str | None:
    """``chat_template: auto``: the template most inputs have (ties: the earliest model's)."""
    templates = [t for folder in folders.values() if (t := read_chat_template(folder)) is not None]
    if not templates:
        return None
    counts = Counter(templates)
    best = max(counts.values())
    return next(t for t in templates if counts[t] == best)


def write_chat_template(folder: Path, template: str) -> None:
    """Write ``template`` as ``chat_template.jinja`` and remove every other copy in ``folder``.

    transformers 5 reads ``chat_template.jinja`` first; a stale template left in
    ``tokenizer_config.json`` or ``chat_template.json`` would confuse older readers.
    """
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in settings:
            del settings["chat_template"]
            config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
