"""Vocabulary union/selection and embedding-row alignment (MergeKit's ``tokenizer`` rules).

When a config sets ``tokenizer_source`` or ``tokenizer:``, the output vocabulary is chosen
first (the base's, one model's, or the union of all), then every input's embedding and LM-head
rows are re-indexed to it before the merge method runs, one tensor at a time:

- a model that has the output token gives its own row;
- a model that lacks it gets the token's *default row*: the base's row when the base has the
  token, else the single holder's row, else the mean of the holders' rows, and zeros when no
  model has it (a ``tokens:`` entry can name the row instead, and ``force`` gives that row to
  every model);
- rows past the vocabulary (``pad_to_multiple_of``) are the mean of the model's real rows.

The method then runs unchanged over the aligned matrices. With ``missing_rows: holders_only``
a token that only some models have is merged from those models alone (see
:func:`merge_holders_only`).

New tokens get fixed ids: the base's tokens keep theirs, then each other model's tokens that
are new, model by model in config order and by id within a model, then the new ``tokens:``
keys in config order. The same config always gives the same ids.

The rules work on :class:`Vocabulary` objects and tensors only; reading and writing tokenizer
files lives in :mod:`alloykit.io.tokenizer_files`, which :func:`plan_tokenizer` uses to read
the inputs' tokenizers at plan time (no tensor data is read).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from alloykit.errors import ConfigError, IncompatibleModels

if TYPE_CHECKING:
    from alloykit.methods import MethodInputs

log = logging.getLogger("alloykit")

MissingRows = Literal["default_row", "holders_only"]
# Below this share of shared tokens (of the smaller of a model's vocabulary and the reference
# one), a model's tokenizer is not a variant of the others' (mapping rows between unrelated
# tokenizers is tokenizer surgery: out of scope).
MIN_SHARED = 0.5


@dataclass(frozen=True)
class Vocabulary:
    """One model's tokenizer as far as rows go: ``tokens`` maps each token to its row.

    Only tokens whose id is below ``rows`` (the model's embedding rows) are kept: a tokenizer
    entry without an embedding row cannot be merged (MergeKit strips them the same way).
    ``added`` holds the tokenizer's added-token entries (flags such as ``special``) by content.
    """

    label: str
    tokens: Mapping[str, int]
    rows: int
    added: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def by_id(self) -> list[str]:
        """The kept tokens in id order."""
        return sorted(self.tokens, key=self.tokens.__getitem__)


@dataclass(frozen=True)
class TokenRow:
    """A configured row for one token (a ``tokenizer.tokens`` entry), resolved to a model row.

    ``model``/``row`` name the row; ``model`` None means zeros. ``force`` gives it to every
    model, not only to those lacking the token.
    """

    model: str | None
    row: int
    force: bool


@dataclass
class VocabularyPlan:
    """The output vocabulary and how each model's rows map onto it.

    ``index[label][i]`` is model ``label``'s row for output token ``i`` (-1 when it lacks it).
    Only the tokens ``default_ids`` (some model lacks them, or ``tokens:`` configures them) have
    a default row: the mean of the rows ``contributions`` lists for it (``counts[i]`` of them;
    zeros when none). ``forced[i]`` gives the default row to every model.
    """

    tokens: list[str]  # output id -> token
    rows: int  # output rows: len(tokens) rounded up to pad_to_multiple_of
    index: dict[str, np.ndarray]
    contributions: dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (output ids, rows)
    counts: np.ndarray
    default_ids: np.ndarray  # sorted output ids that have a default row
    forced: np.ndarray
    missing_rows: MissingRows
    added: dict[str, dict[str, Any]]  # added-token entries of the output, by content
    source: str  # "base", "union" or the label of the model whose tokenizer is the output's
    model_rows: dict[str, int] = field(default_factory=dict)  # each model's embedding rows
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def token_ids(self) -> dict[str, int]:
        """The output's token -> id map."""
        return {token: i for i, token in enumerate(self.tokens)}

    def holders(self, label: str) -> np.ndarray:
        """For each output row, whether model ``label`` merges its own row (padding: yes)."""
        held = np.ones(self.rows, dtype=bool)
        held[: self.size] = (self.index[label] >= 0) & ~self.forced
        return held


# --------------------------------------------------------------------------- choosing


def output_tokens(
    source: str, vocabularies: Mapping[str, Vocabulary], base: str, extra: Sequence[str]
) -> list[str]:
    """The output vocabulary in id order.

    ``source`` is ``base``, ``union`` or a model label; ``extra`` are ``tokens:`` keys, added
    after everything else when new. Ids are compacted (an id past a stripped entry moves down).
    """
    if source == "union":
        order = [base, *[label for label in vocabularies if label != base]]
    else:
        order = [base if source == "base" else source]
    tokens: dict[str, None] = {}
    for label in order:
        for token in vocabularies[label].by_id():
            tokens.setdefault(token, None)
    for token in extra:
        tokens.setdefault(token, None)
    return list(tokens)


def check_related(
    vocabularies: Mapping[str, Vocabulary], tokens: Sequence[str], owner: str
) -> None:
    """Refuse a model most of whose tokens are not in ``tokens`` (``owner``'s vocabulary)."""
    wanted = set(tokens)
    for label, vocabulary in vocabularies.items():
        if not vocabulary.tokens:
            continue
        shared = sum(1 for token in vocabulary.tokens if token in wanted)
        # the overlap coefficient: an extension of the reference (or a subset) is related
        if shared < MIN_SHARED * min(len(vocabulary.tokens), len(wanted)):
            raise IncompatibleModels(
                f"model '{label}' shares only {shared} of its {len(vocabulary.tokens)} tokens "
                f"with {owner}: its tokenizer is unrelated, and mapping "
                "rows between unrelated tokenizers (tokenizer surgery) is not supported; merge "
                "models that share a tokenizer family"
            )


def plan_vocabulary(
    *,
    source: str,
    vocabularies: Mapping[str, Vocabulary],
    base: str,
    token_rows: Mapping[str, TokenRow],
    pad_to_multiple_of: int | None,
    missing_rows: MissingRows,
) -> VocabularyPlan:
    """Choose the output vocabulary and each model's row index and default rows.

    ``vocabularies`` are in config order; ``base`` is the base model (else the first).
    ``token_rows`` are the resolved ``tokenizer.tokens`` entries.
    """
    tokens = output_tokens(source, vocabularies, base, list(token_rows))
    # a union is checked against the base: it would hold any vocabulary whole
    owner = base if source in ("base", "union") else source
    reference = list(vocabularies[owner].tokens) if source == "union" else tokens
    check_related(vocabularies, reference, f"the vocabulary of model '{owner}'")
    size = len(tokens)
    rows = size
    if pad_to_multiple_of:
        rows = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    index = {
        label: np.array([v.tokens.get(token, -1) for token in tokens], dtype=np.int64)
        for label, v in vocabularies.items()
    }
    parts: dict[str, tuple[list[int], list[int]]] = {label: ([], []) for label in vocabularies}
    counts = np.zeros(size, dtype=np.int64)
    forced = np.zeros(size, dtype=bool)
    unheld = []
    lacking = np.zeros(size, dtype=bool)
    for model_index in index.values():
        lacking |= model_index < 0
    lacking |= np.array([token in token_rows for token in tokens], dtype=bool)
    default_ids = np.flatnonzero(lacking)
    for i in default_ids.tolist():  # tokens every model has need no default row
        token = tokens[i]
        configured = token_rows.get(token)
        if configured is not None:
            forced[i] = configured.force
            sources = [] if configured.model is None else [(configured.model, configured.row)]
        else:
            holders = [label for label in vocabularies if index[label][i] >= 0]
            if base in holders:
                holders = [base]
            if not holders:
                unheld.append(token)
            sources = [(label, int(index[label][i])) for label in holders]
        for label, row in sources:
            parts[label][0].append(i)
            parts[label][1].append(row)
        counts[i] = len(sources)
    warnings = []
    if unheld:
        warnings.append(
            f"tokenizer: {len(unheld)} output token(s) are in no model (e.g. '{unheld[0]}'); "
            "their embedding and head rows are zeros"
        )
    return VocabularyPlan(
        tokens=tokens,
        rows=rows,
        index=index,
        contributions={
            label: (np.array(ids, dtype=np.int64), np.array(rws, dtype=np.int64))
            for label, (ids, rws) in parts.items()
            if ids
        },
        counts=counts,
        default_ids=default_ids,
        forced=forced,
        missing_rows=missing_rows,
        added=_output_added(tokens, vocabularies, base, source, list(token_rows)),
        source=source,
        model_rows={label: v.rows for label, v in vocabularies.items()},
        warnings=warnings,
    )


def _output_added(
    tokens: Sequence[str],
    vocabularies: Mapping[str, Vocabulary],
    base: str,
    source: str,
    extra: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Added-token entries of the output: the tokenizer source's first, then the other models'
    (first definition wins), then new ``tokens:`` keys as plain added tokens."""
    owner = base if source in ("base", "union") else source
    order = [owner, *[label for label in vocabularies if label != owner]]
    if source != "union":
        order = [owner]
    wanted = set(tokens)
    added: dict[str, dict[str, Any]] = {}
    for label in order:
        vocabulary = vocabularies[label]
        for content, entry in vocabulary.added.items():
            if content in wanted and content in vocabulary.tokens:
                added.setdefault(content, dict(entry))
    # a tokens: key the vocabulary did not have is an added token: the entry a model gives it,
    # else a plain one (it can then be matched in text, as MergeKit's added tokens are)
    held = {t for label in order for t in vocabularies[label].tokens}
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True}
    for token in extra:
        if token in added or token in held:
            continue
        entries = [v.added[token] for v in vocabularies.values() if token in v.added]
        added[token] = dict(entries[0]) if entries else {**plain, "special": False}
    return added


# --------------------------------------------------------------------------- aligning rows


def default_rows(
    vocabulary: VocabularyPlan, raw: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """The default rows ``(len(vocabulary.default_ids), *rest)``, in ``default_ids`` order,
    from the models in ``raw`` (a model outside ``raw`` contributes nothing)."""
    first = next(iter(raw.values()))
    rest = tuple(first.shape[1:])
    device = first.device
    count = len(vocabulary.default_ids)
    slot = _slots(vocabulary)
    defaults = torch.zeros((count, *rest), dtype=dtype, device=device)
    counts = torch.zeros(count, dtype=dtype, device=device)
    for label, (ids, rows) in vocabulary.contributions.items():
        if label not in raw:
            continue
        slots = torch.from_numpy(slot[ids]).to(device)
        defaults.index_add_(0, slots, raw[label][torch.from_numpy(rows).to(device)].to(dtype))
        counts.index_add_(0, slots, torch.ones(len(ids), dtype=dtype, device=device))
    return defaults.div_(counts.clamp(min=1).reshape(-1, *([1] * len(rest))))


def _slots(vocabulary: VocabularyPlan) -> np.ndarray:
    """Output id -> its position in ``default_ids`` (-1 for tokens without a default row)."""
    slot = np.full(vocabulary.size, -1, dtype=np.int64)
    slot[vocabulary.default_ids] = np.arange(len(vocabulary.default_ids))
    return slot


def align_into(
    vocabulary: VocabularyPlan,
    label: str,
    matrix: torch.Tensor,
    defaults: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Write model ``label``'s ``matrix`` re-indexed to the output vocabulary into ``out``
    (``(vocabulary.rows, *rest)``): its own rows, default rows, then mean padding rows.

    Each output row is written once, by two gathers (own rows, default rows).
    """
    size = vocabulary.size
    index = vocabulary.index[label]
    own = (index >= 0) & ~vocabulary.forced
    own_ids, other_ids = np.flatnonzero(own), np.flatnonzero(~own)

    def tensor(ids: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(ids).to(device)

    real = out[:size]
    rows = matrix.index_select(0, tensor(index[own_ids], matrix.device))
    real.index_copy_(0, tensor(own_ids, out.device), rows.to(device=out.device, dtype=out.dtype))
    if len(other_ids):
        picked = defaults.index_select(0, tensor(_slots(vocabulary)[other_ids], defaults.device))
        real.index_copy_(0, tensor(other_ids, out.device), picked.to(out.device, out.dtype))
    if vocabulary.rows > size:  # padding: the mean of the real rows (Hewitt's init)
        out[size:] = real.mean(dim=0, keepdim=True)


def align_rows(
    vocabulary: VocabularyPlan, raw: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Each model's embedding (or head) matrix re-indexed to the output vocabulary.

    ``raw`` maps model labels to their matrices ``(rows_m, *rest)``; the result maps the same
    labels to ``(vocabulary.rows, *rest)`` matrices in ``dtype``. Default rows are computed
    from the models present in ``raw``.
    """
    defaults = default_rows(vocabulary, raw, dtype)
    aligned = {}
    for label, matrix in raw.items():
        out = torch.empty((vocabulary.rows, *defaults.shape[1:]), dtype=dtype, device=matrix.device)
        align_into(vocabulary, label, matrix, defaults, out)
        aligned[label] = out
    return aligned


def merge_holders_only(
    run: Callable[[MethodInputs], torch.Tensor],
    inputs: MethodInputs,
    holders: torch.Tensor,
    full: torch.Tensor,
    min_models: int,
) -> torch.Tensor:
    """``missing_rows: holders_only``: merge each token from the models that have it.

    ``run`` is the method kernel, ``inputs`` the aligned :class:`MethodInputs` and ``full`` the
    method's result over every model (the default-row rule). ``holders`` is ``(k, rows)``:
    whether input ``j`` has token ``i``. Rows every input holds keep ``full``; the rows held by
    the same subset of inputs are merged as one tensor from that subset (its per-model
    parameters, the same base row); a subset smaller than ``min_models`` keeps ``full``.
    """
    from alloykit.methods import MethodInputs

    k = holders.shape[0]
    weights = (2 ** torch.arange(k, device=holders.device)).reshape(k, 1)
    pattern = (holders.to(torch.int64) * weights).sum(dim=0)
    result = full.clone()
    everyone = 2**k - 1
    for code in torch.unique(pattern).tolist():
        if code == everyone:
            continue
        members = [j for j in range(k) if code >> j & 1]
        if len(members) < max(min_models, 1):
            continue
        rows = (pattern == code).nonzero().reshape(-1)
        chosen = torch.tensor(members, device=holders.device)
        sub = MethodInputs(
            inputs.tensors[chosen][:, rows],
            inputs.base[rows] if inputs.base is not None else None,
            {name: values[chosen.cpu()] for name, values in inputs.per_model.items()},
            inputs.params,
            inputs.generator,
        )
        result[rows] = run(sub).to(result.dtype)
    return result


# --------------------------------------------------------------------------- configuration


def resolve_token_rows(
    tokens: Mapping[str, Any] | None,
    vocabularies: Mapping[str, Vocabulary],
    labels: Mapping[str, str],
) -> dict[str, TokenRow]:
    """Resolve the ``tokenizer.tokens`` block to rows; raises one ConfigError listing problems.

    Each entry is ``{source, force}`` where ``source`` is a model, ``{kind: model_token, model,
    token | token_id}`` or ``{kind: zero}``; ``labels`` maps the ways a config may name a model
    to its label. An entry without ``source`` only adds the token (and ``force`` needs one).
    """
    resolved: dict[str, TokenRow] = {}
    problems: list[str] = []
    for token, entry in (tokens or {}).items():
        where = f"tokenizer.tokens.{token}"
        entry = entry or {}
        if not isinstance(entry, Mapping) or set(entry) - {"source", "force"}:
            problems.append(f"{where}: expected {{source, force}}")
            continue
        force = bool(entry.get("force", False))
        source = entry.get("source")
        if source is None:
            if force:
                problems.append(f"{where}: force needs a source")
            continue
        if isinstance(source, str) or (isinstance(source, Mapping) and "kind" not in source):
            label = labels.get(str(source if isinstance(source, str) else source.get("model")))
            if label is None:
                problems.append(f"{where}.source: '{source}' is not one of the config's models")
                continue
            row = vocabularies[label].tokens.get(token)
            if row is None:
                problems.append(
                    f"{where}.source: model '{label}' has no token '{token}' (use "
                    "{kind: model_token, model, token} to take another token's row)"
                )
                continue
            resolved[token] = TokenRow(label, row, force)
            continue
        kind = source.get("kind")
        if kind == "zero":
            resolved[token] = TokenRow(None, -1, force)
            continue
        if kind != "model_token":
            problems.append(f"{where}.source.kind: '{kind}' is not model_token or zero")
            continue
        label = labels.get(str(source.get("model")))
        if label is None:
            problems.append(
                f"{where}.source.model: '{source.get('model')}' is not one of the config's models"
            )
            continue
        vocabulary = vocabularies[label]
        if ("token" in source) == ("token_id" in source):
            problems.append(f"{where}.source: give exactly one of token or token_id")
            continue
        if "token" in source:
            row = vocabulary.tokens.get(str(source["token"]))
            if row is None:
                problems.append(
                    f"{where}.source.token: model '{label}' has no token '{source['token']}'"
                )
                continue
        else:
            row = source["token_id"]
            if not isinstance(row, int) or not 0 <= row < vocabulary.rows:
                problems.append(
                    f"{where}.source.token_id: {row!r} is not a row of model '{label}' "
                    f"(0 to {vocabulary.rows - 1})"
                )
                continue
        resolved[token] = TokenRow(label, row, force)
    if problems:
        raise ConfigError(problems)
    return resolved


# --------------------------------------------------------------------------- planning


@dataclass
class OutputTokenizer:
    """The tokenizer a merge writes, decided at plan time.

    ``vocabulary`` is None when only a chat template is set (the donor's tokenizer is copied
    with it). ``document`` is the output ``tokenizer.json``, None when ``owner``'s tokenizer is
    the output's unchanged (its files are copied). ``token_maps`` holds every model's full
    token -> id map, which moves the special-token ids of the donor's configs.
    """

    vocabulary: VocabularyPlan | None
    document: dict[str, Any] | None
    owner: str  # the model whose tokenizer files the output starts from
    chat_template: str | None
    token_maps: dict[str, dict[str, int]] = field(default_factory=dict)

    def id_moves(self, donor: str) -> tuple[dict[int, str], dict[str, int]] | None:
        """(donor id -> token, output token -> id) when ids may move, else None."""
        if self.vocabulary is None or donor not in self.token_maps:
            return None
        return {i: t for t, i in self.token_maps[donor].items()}, self.vocabulary.token_ids()


def model_rows(label: str, tensors: Mapping[str, Any], config: Mapping[str, Any] | None) -> int:
    """Model ``label``'s number of embedding rows (its token-embedding tensor's first dim)."""
    from alloykit.architecture import input_embedding_name

    name = input_embedding_name(tensors)
    if name is not None:
        return int(tensors[name].shape[0])
    for section in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(section.get("vocab_size"), int):
            return int(section["vocab_size"])
    raise IncompatibleModels(
        f"model '{label}' has no token-embedding tensor, so its rows cannot be aligned to a "
        "merged vocabulary; remove tokenizer_source/tokenizer from the config"
    )


def plan_tokenizer(
    config: Any, checkpoints: Mapping[str, Any], base: str
) -> OutputTokenizer | None:
    """The output tokenizer of ``config`` over opened ``checkpoints``; None when the config sets
    neither ``tokenizer_source``/``tokenizer`` nor ``chat_template``.

    Reads every model's tokenizer files (no tensor data); raises CheckpointError for a model
    without one, IncompatibleModels for unrelated vocabularies, ConfigError for bad ``tokens``.
    """
    from alloykit.io import tokenizer_files as files

    settings = config.tokenizer
    source = settings.source if settings is not None else config.tokenizer_source
    template = None
    if config.chat_template is not None:
        template = resolve_chat_template(
            config.chat_template, {label: c.folder for label, c in checkpoints.items()}
        )
    if source is None:
        if config.chat_template is None:
            return None
        return OutputTokenizer(None, None, base, template)
    documents = {
        label: files.read_tokenizer_document(Path(c.folder), label)
        for label, c in checkpoints.items()
    }
    vocabularies = {
        label: files.document_vocabulary(
            documents[label], label, model_rows(label, c.tensors, c.config)
        )
        for label, c in checkpoints.items()
    }
    token_rows = resolve_token_rows(
        settings.tokens if settings is not None else None,
        vocabularies,
        {label: label for label in vocabularies},
    )
    vocabulary = plan_vocabulary(
        source=source,
        vocabularies=vocabularies,
        base=base,
        token_rows=token_rows,
        pad_to_multiple_of=settings.pad_to_multiple_of if settings is not None else None,
        missing_rows=settings.missing_rows if settings is not None else "default_row",
    )
    owner = base if source in ("base", "union") else source
    token_maps = {label: full_token_map(documents[label]) for label in documents}
    document = None
    if token_maps[owner] != vocabulary.token_ids():
        document = files.build_document(documents[owner], vocabulary, owner)
        if full_token_map(document) != vocabulary.token_ids():
            raise IncompatibleModels(
                f"the merged tokenizer built from model '{owner}' does not resolve every token "
                "to its aligned id; please report this tokenizer"
            )
    return OutputTokenizer(vocabulary, document, owner, template, token_maps)


def full_token_map(document: Mapping[str, Any]) -> dict[str, int]:
    """A tokenizer document's whole token -> id map (added tokens included)."""
    import json

    from tokenizers import Tokenizer

    vocab: dict[str, int] = Tokenizer.from_str(json.dumps(document)).get_vocab(
        with_added_tokens=True
    )
    return vocab


def resolve_chat_template(name: str, folders: Mapping[str, Any]) -> str | None:
    """``auto`` (the template most inputs have), a built-in name, or the literal template."""
    from alloykit.chat_templates import CHAT_TEMPLATES
    from alloykit.io.tokenizer_files import most_common_template

    if name == "auto":
        template = most_common_template({label: Path(f) for label, f in folders.items()})
        if template is None:
            log.warning("chat_template: auto: no input model has a chat template; none is set")
        return template
    return CHAT_TEMPLATES.get(name, name)
