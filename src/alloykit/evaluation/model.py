"""What is evaluated: a model folder, a repo id, a merge config merged in memory, or a state dict;
and the :class:`Skeleton` that holds one loaded model and takes new weights in place.

A skeleton is built once per architecture (config) and tokenizer; evaluating other weights of
the same architecture copies them into its parameters (``load_state_dict``), never rebuilding the
model, which is what makes repeated evaluation during a recipe search cheap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alloykit.errors import AlloyError, CheckpointError, TaskError
from alloykit.evaluation.runner import Batching

if TYPE_CHECKING:
    from alloykit.pipeline import MergedState, MergeOptions

log = logging.getLogger("alloykit")
_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
CONFIG_SUFFIXES = (".yml", ".yaml")


@dataclass(frozen=True)
class ModelSource:
    """Weights to evaluate, with the config and tokenizer that make them a model."""

    name: str
    config: dict[str, Any]
    tokenizer_folder: Path
    state: Mapping[str, torch.Tensor]
    recipe_hash: str | None = None


def is_merge_config(model: object) -> bool:
    """True for a MergeConfig, a merge config as a dict, or a ``.yml``/``.yaml`` file."""
    from alloykit.config import MergeConfig

    if isinstance(model, MergeConfig):
        return True
    if isinstance(model, Mapping):
        return any(k in model for k in ("merge_method", "models", "slices"))
    return isinstance(model, str | Path) and Path(model).suffix in CONFIG_SUFFIXES


def resolve_source(
    model: Any, *, like: str | Path | None = None, merge_options: MergeOptions | None = None
) -> ModelSource:
    """Turn what the user passed into a :class:`ModelSource`.

    ``model`` is a model folder or repo id, a merge config (file, dict or MergeConfig; merged in
    memory, nothing written), a :class:`~alloykit.pipeline.MergedState`, or a state dict
    ``{name: tensor}``, which needs ``like``: a model folder or repo id of the same architecture
    whose config and tokenizer it uses.
    """
    from alloykit.pipeline import MergedState

    if isinstance(model, MergedState):  # already merged in memory (merge_in_memory)
        return _from_merged(model, "<merged state>")
    if is_merge_config(model):
        return _merged_source(model, merge_options)
    if isinstance(model, Mapping):
        if like is None:
            raise AlloyError(
                "a state dict has no config or tokenizer: pass like=MODEL (a folder or repo id "
                "of the same architecture, e.g. the base model)"
            )
        folder = _folder(str(like))
        return ModelSource("<state dict>", read_model_config(folder), folder, model)
    folder = _folder(str(model))
    return ModelSource(
        str(model), read_model_config(folder), folder, _read_state(folder), _recipe_hash_of(folder)
    )


def _merged_source(config: Any, merge_options: MergeOptions | None) -> ModelSource:
    from alloykit.pipeline import merge_in_memory

    merged = merge_in_memory(config, merge_options)
    for warning in merged.plan.warnings:
        log.warning(warning)
    return _from_merged(merged, str(config) if isinstance(config, str | Path) else "<merge config>")


def _from_merged(merged: MergedState, name: str) -> ModelSource:
    if merged.config is None:
        raise AlloyError(
            f"{name}: the merge has no config.json (raw state-dict inputs), so it cannot be "
            "evaluated; pass its state dict with like=MODEL"
        )
    return ModelSource(name, merged.config, merged.donor_folder, merged.state, merged.recipe_hash)


def _folder(reference: str) -> Path:
    from alloykit.io.hub import resolve_model

    folder = resolve_model(reference)
    if not folder.is_dir():
        raise CheckpointError(
            f"model '{reference}': evaluation needs a model folder with config.json"
        )
    return folder


def read_model_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict."""
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"model '{folder}' has no config.json; evaluation needs one")
    config: dict[str, Any] = json.loads(file.read_text())
    return config


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from alloykit.io.checkpoint import open_checkpoint

    with open_checkpoint(folder) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}


def _recipe_hash_of(folder: Path) -> str | None:
    """The recipe hash of a folder alloykit merged (from its ``alloykit_config.yml``), else None."""
    from alloykit.pipeline import RECIPE_FILE, recipes_hash
    from alloykit.stages import load_stages

    file = folder / RECIPE_FILE
    if not file.is_file():
        return None
    try:
        return recipes_hash(load_stages(file))
    except AlloyError:
        return None


def architecture_key(config: Mapping[str, Any], tokenizer_folder: Path) -> str:
    """Equal for models that one skeleton can hold: the same config (but the dtype) and the same
    tokenizer files (by content, so fine-tunes that copied the base's tokenizer share one)."""
    import hashlib

    kept = {k: v for k, v in config.items() if k not in _VOLATILE_KEYS}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode())
    digest.update(_tokenizer_digest(tokenizer_folder).encode())
    return digest.hexdigest()


_TOKENIZER_DIGESTS: dict[tuple[str, tuple[float, ...]], str] = {}


def _tokenizer_digest(folder: Path) -> str:
    """A hash of a folder's tokenizer files, recomputed only when one of them changes (a real
    tokenizer.json is megabytes, and a search asks for this on every call)."""
    import hashlib

    from alloykit.io.writer import TOKENIZER_FILES

    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    key = (str(folder.resolve()), tuple(f.stat().st_mtime for f in files))
    if key not in _TOKENIZER_DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\x1f" + file.read_bytes())
        _TOKENIZER_DIGESTS[key] = digest.hexdigest()
    return _TOKENIZER_DIGESTS[key]


def config_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype a model config declares (float32 when it declares none)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def build_model(config: Mapping[str, Any], dtype: torch.dtype, device: torch.device) -> Any:
    """An initialised ``transformers`` model of ``config``'s first architecture (weights random)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = str(config.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"config.json model_type {model_type!r} is unknown to transformers")
    hf_config = CONFIG_MAPPING[model_type].from_dict(dict(config))
    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device(device):
        if model_class is None:  # no (known) architecture: a causal LM, else the bare model
            try:
                model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            except ValueError:
                model = transformers.AutoModel.from_config(hf_config, dtype=dtype)
        else:
            model = model_class._from_config(hf_config, dtype=dtype)
    return model.eval()


def load_weights(model: Any, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Copy ``state`` into ``model``'s parameters in place; every parameter must be given
    (tied aliases excepted)."""
    result = model.load_state_dict(dict(state), strict=False)
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    tied = _tied_targets(model)
    missing = [k for k in result.missing_keys if k not in aliases and k not in tied]
    if missing:
        raise CheckpointError(
            f"model '{name}': its weights lack {len(missing)} tensors the architecture needs "
            f"(first: {missing[0]}); is it a different architecture than the model it is loaded as?"
        )
    if result.unexpected_keys:
        log.debug(f"model '{name}': ignored tensors {result.unexpected_keys[:5]}")


def _tied_targets(model: Any) -> set[str]:
    """Parameter names that ``transformers`` ties to another (the LM head of tied embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, dict | list | tuple | set) else set()


class Skeleton:
    """One loaded model, its tokenizer, and classification models built around its backbone.

    State: the model's parameters (overwritten by :meth:`load`), the tokenizer, the heads built so
    far and the batch size that fits. Build once; :meth:`load` new weights as often as needed.
    """

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.key = architecture_key(source.config, source.tokenizer_folder)
        self.device = device
        self.dtype = dtype or config_dtype(source.config)
        self.model = build_model(source.config, self.dtype, device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_folder))
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"model '{source.name}': no tokenizer in '{source.tokenizer_folder}' ({e})"
            ) from e
        self.pad_id = _pad_id(self.tokenizer)
        self.prefix_id = (
            self.tokenizer.bos_token_id
            if self.tokenizer.bos_token_id is not None
            else self.tokenizer.eos_token_id
        )
        self.max_length = _max_length(self.model.config)
        self.heads: dict[str, Any] = {}
        self._synced: set[str] = set()  # heads whose backbone holds the current weights
        self._auto: Batching | None = None
        self._prepared: dict[tuple[object, ...], Any] = {}
        self.name = source.name

    def load(self, source: ModelSource) -> None:
        """Copy ``source``'s weights into the model (and later into each head's backbone)."""
        load_weights(self.model, source.state, source.name)
        self.name = source.name
        self._synced = set()

    def batching(self, size: int | None) -> Batching:
        """The batching of this skeleton: a fixed ``size``, or automatic (remembered across runs)."""
        if size is not None:
            return Batching(size, self.device)
        if self._auto is None:
            self._auto = Batching(None, self.device)
        return self._auto

    def prepared(self, key: tuple[object, ...], make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key`` (a task's token ids), kept for later weights."""
        if key not in self._prepared:
            self._prepared[key] = make()
        return self._prepared[key]

    def causal_lm(self, task_name: str) -> Any:
        """The model, checked to have a language-model head."""
        if self.model.get_output_embeddings() is None:
            raise TaskError(
                f"task '{task_name}': model '{self.name}' ({type(self.model).__name__}) has no "
                "language-model head; only classification tasks can score it"
            )
        return self.model

    def classifier(self, head: str, task_name: str) -> tuple[Any, Any]:
        """``(model, id2label)``: the head model ``head`` with this model's backbone loaded in."""
        model = self.heads.get(head)
        if model is None:
            model = self.heads[head] = _load_head(head, task_name, self.dtype, self.device)
            if model.config.pad_token_id is None:  # needed to find each row's last token
                model.config.pad_token_id = self.pad_id
        if head not in self._synced:
            backbone = self.model.base_model.state_dict()
            target = model.base_model
            result = target.load_state_dict(backbone, strict=False)
            if result.missing_keys:
                raise TaskError(
                    f"task '{task_name}': model '{self.name}' does not fit the backbone of head "
                    f"model '{head}' (missing {result.missing_keys[0]}); use a head fine-tuned "
                    "from the same base"
                )
            self._synced.add(head)
        return model, model.config.id2label


def _load_head(head: str, task_name: str, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForSequenceClassification

    folder = _folder(head)
    architectures = read_model_config(folder).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise TaskError(
            f"task '{task_name}': head model '{head}' has no sequence-classification head "
            f"(architectures: {architectures or 'none'}); name a *ForSequenceClassification "
            "fine-tune in the task's 'head' field"
        )
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype)
    return model.to(device).eval()


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _max_length(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, 8192)
    return 2048
