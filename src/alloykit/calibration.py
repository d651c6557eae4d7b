"""Calibration statistics: what the data-aware methods measure by running models on text.

Owns the ``calibration:`` section's data (reading local JSONL/TXT or a task file, tokenizing
into fixed-size blocks), the forward (and for Fisher, backward) passes, and the per-model cache. Three
statistics, each a safetensors file of one model:

- ``gram``: per linear layer, ``G = XᵀX`` over every calibration token (RegMean, Jin et al.
  2023, arXiv:2212.09849); layers that read the same input (q/k/v, gate/up) share one matrix;
- ``activation``: per linear layer, ``a_j = Σ_batches mean_tokens |x_j|`` (AIM, Nobari et al.
  2025, arXiv:2502.02421), measured on the base model only;
- ``fisher``: per parameter, the diagonal Fisher ``mean_x (∂ log p(y|x)/∂θ)²`` with ``y`` drawn
  from the model's own predictions at every position of a block, one backward pass per block
  (Matena & Raffel 2022, arXiv:2111.09832).

Memory: the forward-only statistics run each model through :func:`streamed_model`, which holds
one module's weights at a time (read from the checkpoint when the module runs, dropped after),
so a pass needs one batch of activations plus the statistics being accumulated (a ``d×d`` float64
matrix per distinct linear input for ``gram``, a ``d``-vector for ``activation``). Fisher needs
every parameter and its gradient at once: one whole model (float32) and its Fisher. Results are
written to ``cache_dir`` under a name keyed by the model's files, the data and the settings, so
each model is measured once; the merge then reads them one tensor at a time (mmap), like the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alloykit.config import CalibrationConfig
from alloykit.errors import CalibrationError
from alloykit.io.checkpoint import Checkpoint

log = logging.getLogger("alloykit")
Statistic = Literal["gram", "activation", "fisher"]
DEFAULT_CACHE = Path("~/.cache/alloykit/calibration")
_FORMAT = 1  # bump when a statistic's definition changes, so old cache files are not reused


# --------------------------------------------------------------------------- data


def read_texts(calibration: CalibrationConfig) -> list[str]:
    """The calibration texts: each JSONL line's ``text_key`` field, a whole TXT file, or the
    examples of an evaluation task file (``.yml``; see :func:`task_texts`)."""
    path = Path(calibration.data).expanduser()
    if not path.is_file():
        raise CalibrationError(
            f"calibration.data: '{calibration.data}' does not exist; give a local .jsonl or "
            ".txt file"
        )
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(
                    f"calibration.data: '{path}' line {number} is not JSON ({e.msg})"
                ) from e
            if not isinstance(record, dict) or not isinstance(
                record.get(calibration.text_key), str
            ):
                raise CalibrationError(
                    f"calibration.data: '{path}' line {number} has no string field "
                    f"'{calibration.text_key}' (set calibration.text_key)"
                )
            texts.append(record[calibration.text_key])
        return texts
    if path.suffix == ".txt":
        return [path.read_text()]
    if path.suffix in (".yml", ".yaml"):
        return task_texts(path)
    raise CalibrationError(
        f"calibration.data: '{path}' is neither .jsonl, .txt nor a task file (.yml)"
    )


def task_texts(path: Path) -> list[str]:
    """The texts of an evaluation task file: each example's prompt (with its few-shot examples)
    followed by its right answer, the way the task presents it to a model."""
    from alloykit.evaluation.tasks import context_text, load_task

    task = load_task(path)
    texts = []
    for example in task.examples:
        answer = example.targets[0] if example.targets else ""
        if example.choices and example.label is not None:
            answer = example.choices[example.label]
        texts.append(context_text(task, example) + answer)
    return texts


def token_blocks(
    calibration: CalibrationConfig, texts: Sequence[str], tokenizer: Any, label: str
) -> torch.Tensor:
    """``(samples, sequence_length)`` token ids: the texts' tokens joined by EOS, cut in blocks."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    wanted = calibration.samples * calibration.sequence_length
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= wanted:
            break
    if len(stream) < wanted:
        raise CalibrationError(
            f"calibration.data: '{calibration.data}' gives {len(stream)} tokens with model "
            f"'{label}''s tokenizer, fewer than samples × sequence_length = "
            f"{calibration.samples} × {calibration.sequence_length} = {wanted}; add text or "
            "lower samples or sequence_length"
        )
    return torch.tensor(stream[:wanted]).reshape(calibration.samples, -1)


# --------------------------------------------------------------------------- models


def _model_class(checkpoint: Checkpoint) -> Any:
    """The ``transformers`` class of a checkpoint that can run forward; CalibrationError if none."""
    from alloykit.stages import MemoryCheckpoint

    label = checkpoint.label
    if isinstance(checkpoint, MemoryCheckpoint):
        raise CalibrationError(
            f"model '{label}' is an earlier stage kept in memory and cannot run forward on "
            "calibration data; pass --intermediate-dir to write it to a folder"
        )
    if checkpoint.config is None or checkpoint.folder.is_file():
        raise CalibrationError(
            f"model '{label}' ('{checkpoint.folder}') has no config.json, so it cannot run "
            "forward on calibration data; data-aware methods need Hugging Face model folders"
        )
    import transformers

    architectures = checkpoint.config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    return model_class or transformers.AutoModel


def _loading(checkpoint: Checkpoint, load: Callable[[], Any]) -> Any:
    """``load()``, with transformers' loading failures as a CalibrationError naming the model."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as e:
        raise CalibrationError(
            f"model '{checkpoint.label}' ('{checkpoint.folder}') cannot be loaded to run forward "
            f"on calibration data: {' '.join(str(e).split())[:200]}"
        ) from e


def load_tokenizer(checkpoint: Checkpoint) -> Any:
    """The checkpoint's tokenizer (from its folder)."""
    import transformers

    _model_class(checkpoint)
    folder = str(checkpoint.folder)
    return _loading(checkpoint, lambda: transformers.AutoTokenizer.from_pretrained(folder))


def load_model(checkpoint: Checkpoint) -> Any:
    """The whole checkpoint as its ``transformers`` class (float32, eval mode), and its tokenizer.

    Fisher needs every parameter at once (each gets a gradient); the forward-only statistics
    use :func:`streamed_model` instead.
    """
    model_class = _model_class(checkpoint)
    folder = str(checkpoint.folder)
    model = _loading(checkpoint, lambda: model_class.from_pretrained(folder, dtype=torch.float32))
    return model.eval(), load_tokenizer(checkpoint)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory, no initialisation);
    their buffers (rotary frequencies, position ids) are built as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def streamed_model(checkpoint: Checkpoint, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The checkpoint as its ``transformers`` class, holding one module's weights at a time.

    Parameters stay on the meta device; a hook reads a module's own parameters from the
    checkpoint (float32) just before the module runs and drops them right after, so a forward
    pass holds the activations and one module's weights, whatever the model's size. Tied
    parameters are read under whichever of their names the checkpoint stores. Buffers and
    parameters live on ``device``.
    """
    import transformers

    model_class = _model_class(checkpoint)
    folder = str(checkpoint.folder)
    config = _loading(checkpoint, lambda: transformers.AutoConfig.from_pretrained(folder))
    with _parameters_on_meta():
        model = model_class(config)
    names: dict[int, list[str]] = {}
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # a tied head -> its embedding
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).extend([name] + ([tied[name]] if name in tied else []))

    def stored_name(param: torch.nn.Parameter) -> str:
        candidates = names[id(param)]
        found = next((n for n in candidates if n in checkpoint.tensors), None)
        if found is None:
            raise CalibrationError(
                f"model '{checkpoint.label}' has no tensor '{candidates[0]}', which its class "
                f"{model_class.__name__} needs to run forward"
            )
        return found

    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
        metas = {n: p for n, p in module._parameters.items() if p is not None}
        if not metas:
            continue
        sources = {n: stored_name(p) for n, p in metas.items()}

        def load(module: torch.nn.Module, args: Any, sources: dict[str, str] = sources) -> None:
            for name, source in sources.items():
                value = checkpoint.read(source).to(device=device, dtype=torch.float32)
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)

        def drop(
            module: torch.nn.Module,
            args: Any,
            output: Any,
            metas: dict[str, torch.nn.Parameter] = metas,
        ) -> None:
            module._parameters.update(metas)

        module.register_forward_pre_hook(load)
        module.register_forward_hook(drop)
    return model.eval()


def _linear_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, int]]:
    """``{weight tensor name: (module, input axis of its weight)}`` for every linear layer."""
    from transformers.pytorch_utils import Conv1D

    layers: dict[str, tuple[torch.nn.Module, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[f"{name}.weight"] = (module, 1)  # weight (out, in)
        elif isinstance(module, Conv1D):
            layers[f"{name}.weight"] = (module, 0)  # GPT-2 stores (in, out)
    return layers


def input_statistics(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    statistic: Statistic,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """Per linear layer, the Gram matrix or mean |activation| of its inputs over ``blocks``.

    Returns (statistics by the first layer's weight name, input axis by weight name, aliases:
    weight name -> the name whose statistic it shares because it reads the same input).
    """
    layers = _linear_layers(model)
    totals: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    # the last input seen and its first reader; q/k/v (gate/up) are called one after another
    # on the very same tensor object, and holding it keeps its memory from being reused
    last: list[Any] = [None, ""]

    def hook(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if x is last[0]:  # read by the previous layer too: measure it once
                aliases[name] = last[1]
                return
            last[0], last[1] = x, name
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, d)
            # gram: (d, d); activation: (d,), the mean over this batch's tokens
            update = flat.T @ flat if statistic == "gram" else flat.abs().mean(0)
            previous = totals.get(name)
            totals[name] = update if previous is None else previous.add_(update)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, (m, _) in layers.items()]
    try:
        with torch.no_grad():
            for start in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[start : start + batch_size].to(device))
    finally:
        last[0] = None
        for handle in handles:
            handle.remove()
    axes = {name: axis for name, (_, axis) in layers.items()}
    aliases = {n: a for n, a in aliases.items() if n not in totals}
    return totals, axes, aliases


def fisher_statistics(
    model: Any, blocks: torch.Tensor, seed: int, label: str
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of every parameter: mean over blocks of (∂ log p(y|x)/∂θ)².

    ``y`` is drawn from the model's own distribution (the Fisher of Matena & Raffel 2022, not
    the empirical one on the data's next tokens): at every position for a language model, one
    label per block for a sequence classifier. One backward pass per block, so each block is
    one example; the draws use a CPU generator seeded by ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    totals = {name: torch.zeros_like(p) for name, p in parameters.items()}
    device = next(iter(parameters.values())).device
    for block in blocks:
        model.zero_grad(set_to_none=True)
        logits = getattr(model(input_ids=block[None].to(device)), "logits", None)
        if logits is None:
            raise CalibrationError(
                f"fisher: model '{label}' ({type(model).__name__}) has no head that gives "
                "logits, so it defines no p(y|x); use a ...ForCausalLM, ...ForMaskedLM or "
                "...ForSequenceClassification checkpoint"
            )
        # (positions, classes): every position of a language model, the one label of a classifier
        log_probs = torch.log_softmax(logits[0].float().reshape(-1, logits.shape[-1]), dim=-1)
        with torch.no_grad():
            drawn = torch.multinomial(log_probs.exp().cpu(), 1, generator=generator)
        log_probs.gather(1, drawn.to(device)).sum().backward()
        for name, p in parameters.items():
            if p.grad is not None:
                totals[name].addcmul_(p.grad, p.grad)
    model.zero_grad(set_to_none=True)
    return {name: (t / blocks.shape[0]).cpu().contiguous() for name, t in totals.items()}


# --------------------------------------------------------------------------- cache


class StatisticsFile:
    """One model's statistic, read one tensor at a time from its safetensors cache file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        metadata = self._file.metadata() or {}
        self.axes: dict[str, int] = json.loads(metadata.get("axes", "{}"))
        self.aliases: dict[str, str] = json.loads(metadata.get("aliases", "{}"))
        self._names = set(self._file.keys())

    def read(self, name: str) -> torch.Tensor | None:
        """The statistic of tensor ``name``, or None when this model has none for it."""
        name = self.aliases.get(name, name)
        return self._file.get_tensor(name) if name in self._names else None

    def input_axis(self, name: str) -> int:
        return self.axes.get(name, -1)

    @cached_property
    def norm(self) -> float:
        """The L2 norm of the whole statistic (every tensor, read one at a time)."""
        squares = sum(float(self._file.get_tensor(n).double().square().sum()) for n in self._names)
        return math.sqrt(squares)


def _cache_key(
    checkpoint: Checkpoint,
    statistic: Statistic,
    calibration: CalibrationConfig,
    texts: Sequence[str],
) -> str:
    """A digest of what the statistic depends on: the model's files, the texts, the settings."""
    folder = checkpoint.folder.resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".md")
    key = {
        "format": _FORMAT,
        "statistic": statistic,
        "model": str(folder),
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "texts": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest(),
        "text_key": calibration.text_key,
        "samples": calibration.samples,
        "sequence_length": calibration.sequence_length,
        "seed": calibration.seed if statistic == "fisher" else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def model_statistics(
    checkpoint: Checkpoint,
    statistic: Statistic,
    calibration: CalibrationConfig,
    device: torch.device | str = "cpu",
) -> StatisticsFile:
    """``statistic`` of ``checkpoint`` on the calibration data, from the cache or measured now
    (the passes run on ``device``)."""
    texts = read_texts(calibration)  # a bad file fails before any model is loaded
    cache = Path(calibration.cache_dir or DEFAULT_CACHE).expanduser()
    _model_class(checkpoint)  # a model that cannot run forward fails before the cache is read
    safe_label = "".join(c if c.isalnum() or c in "-_." else "_" for c in checkpoint.label)
    path = (
        cache
        / f"{safe_label[-60:]}-{statistic}-{_cache_key(checkpoint, statistic, calibration, texts)}.safetensors"
    )
    if path.is_file():
        return StatisticsFile(path)
    blocks = token_blocks(calibration, texts, load_tokenizer(checkpoint), checkpoint.label)
    metadata: dict[str, str] = {}
    if statistic == "fisher":
        model, _ = load_model(checkpoint)
        model.to(device)
        tensors = fisher_statistics(model, blocks, calibration.seed, checkpoint.label)
    else:
        model = streamed_model(checkpoint, device)
        try:
            totals, axes, aliases = input_statistics(
                model, blocks, calibration.batch_size, statistic, device
            )
        except (RuntimeError, NotImplementedError) as e:
            # a module reading another module's weights sees them on the meta device
            log.warning(
                f"model '{checkpoint.label}' cannot run one module at a time ({e!s:.120}); "
                "loading it whole to measure its calibration statistics"
            )
            model = load_model(checkpoint)[0].to(device)
            totals, axes, aliases = input_statistics(
                model, blocks, calibration.batch_size, statistic, device
            )
        tensors = {name: total.float().cpu().contiguous() for name, total in totals.items()}
        metadata = {"axes": json.dumps(axes), "aliases": json.dumps(aliases)}
    del model
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)  # atomic: a concurrent merge sees the whole file or none
    return StatisticsFile(path)
