"""The evaluation verb: score a model (folder, repo id, merge config or state dict) on tasks.

:func:`evaluate` resolves the model, reuses the loaded skeleton of the previous call when the
architecture and tokenizer are the same (copying the new weights in), tokenises each task once
per skeleton, and runs each task's metric. :func:`score_task` is one task on one skeleton.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alloykit.errors import TaskError
from alloykit.evaluation import metrics, runner
from alloykit.evaluation.model import ModelSource, Skeleton, resolve_source
from alloykit.evaluation.tasks import Task, context_text, label_index, load_task

if TYPE_CHECKING:
    from alloykit.pipeline import MergeOptions

TaskSource = Task | str | Path


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate (the flags of ``alloykit evaluate``).

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (default cpu).
        batch_size: sequences per forward pass; None (``auto``) starts large and halves on
            out-of-memory.
        dtype: ``float32``, ``bfloat16`` or ``float16``; None uses the model's own.
        max_length: longest sequence fed to the model; None uses the model's positions.
        threads: CPU threads for torch (default: torch's choice).
        merge: options for merge configs merged in memory (device, seed, ...).
    """

    device: str = "cpu"
    batch_size: int | None = None
    dtype: str | None = None
    max_length: int | None = None
    threads: int | None = None
    merge: MergeOptions | None = None


@dataclass(frozen=True)
class TaskResult:
    """One task's scores; ``primary`` names the main one (``scores[primary]`` is :attr:`value`)."""

    task: str
    metric: str
    primary: str
    scores: dict[str, float]
    n: int
    lower_is_better: bool = False
    seconds: float = 0.0

    @property
    def value(self) -> float:
        return self.scores[self.primary]


@dataclass(frozen=True)
class Results:
    """The scores of one model on some tasks, with the recipe hash when it is a merge."""

    model: str
    recipe_hash: str | None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, task: str) -> float:
        """The primary score of ``task``."""
        return self.tasks[task].value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class ProgressHook(Protocol):
    """Told when a task starts (with its number of forward-pass items) and as items finish."""

    def start(self, label: str, total: int) -> None: ...

    def advance(self, count: int) -> None: ...


# One skeleton is kept between calls: a search evaluates many weights of one architecture, and
# keeping more would hold several models in memory for no gain.
_SKELETON: list[Skeleton] = []
_TASKS: dict[tuple[str, float], Task] = {}


def evaluate(
    model: Any,
    tasks: TaskSource | Sequence[TaskSource],
    options: EvalOptions | None = None,
    *,
    like: str | Path | None = None,
    progress: ProgressHook | None = None,
) -> Results:
    """Score ``model`` on ``tasks``; returns :class:`Results`.

    ``model`` is a model folder or repo id, a merge config (a ``.yml`` file, dict or MergeConfig:
    merged in memory, nothing written), or a state dict ``{name: tensor}`` with ``like`` naming a
    model of the same architecture (its config and tokenizer). Repeated calls with models of the
    same architecture load the new weights into the model built by the first call.

    Example:
        >>> results = evaluate("merge.yml", ["tasks/arith.yml"])  # doctest: +SKIP
        >>> results["arith"]  # doctest: +SKIP
        0.75
    """
    started = time.perf_counter()
    options = options or EvalOptions()
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    loaded = [get_task(t) for t in ([tasks] if isinstance(tasks, str | Path | Task) else tasks)]
    names = [t.name for t in loaded]
    for name in names:
        if names.count(name) > 1:
            raise TaskError(f"two tasks are named '{name}'; give one a different name: field")
    source = resolve_source(model, like=like, merge_options=options.merge)
    skeleton = skeleton_for(source, options)
    scores = {task.name: score_task(skeleton, task, options, progress) for task in loaded}
    return Results(source.name, source.recipe_hash, scores, time.perf_counter() - started)


def get_task(task: TaskSource) -> Task:
    """A task object, or the task file at a path (parsed once while the file is unchanged)."""
    if isinstance(task, Task):
        return task
    path = Path(task)
    key = (str(path.resolve()), path.stat().st_mtime if path.is_file() else 0.0)
    if key not in _TASKS:
        _TASKS[key] = load_task(path)
    return _TASKS[key]


def skeleton_for(source: ModelSource, options: EvalOptions) -> Skeleton:
    """The kept skeleton when it fits ``source`` (same architecture, tokenizer, device, dtype),
    else a new one; in both cases holding ``source``'s weights."""
    import torch

    from alloykit.evaluation.model import architecture_key, config_dtype
    from alloykit.execute import resolve_device

    device = resolve_device(options.device)
    dtype = getattr(torch, options.dtype) if options.dtype else config_dtype(source.config)
    key = architecture_key(source.config, source.tokenizer_folder)
    if _SKELETON:
        kept = _SKELETON[0]
        if kept.key == key and kept.device == device and kept.dtype == dtype:
            kept.load(source)
            return kept
    _SKELETON.clear()
    skeleton = Skeleton(source, device, dtype)
    skeleton.load(source)
    _SKELETON.append(skeleton)
    return skeleton


def score_task(
    skeleton: Skeleton,
    task: Task,
    options: EvalOptions | None = None,
    progress: ProgressHook | None = None,
) -> TaskResult:
    """Run one task on the weights ``skeleton`` holds."""
    started = time.perf_counter()
    options = options or EvalOptions()
    batching = skeleton.batching(options.batch_size)
    max_length = options.max_length or skeleton.max_length
    kind = task.kind

    def advance_for(total: int) -> runner.Advance | None:
        if progress is None:
            return None
        progress.start(f"{task.name} ({skeleton.name})", total)
        return progress.advance

    if kind == "classification":
        scores = _classification(skeleton, task, batching, max_length, advance_for)
    else:
        model = skeleton.causal_lm(task.name)
        # the examples' hash keeps the token ids right when a task file is edited between calls
        key = (str(task.path), task.name, max_length, hash(task.examples))
        prepared = skeleton.prepared(key, lambda: _prepare(skeleton, task, max_length))
        if kind == "exact_match":
            outputs = runner.generate(
                model,
                skeleton.tokenizer,
                prepared,
                max_new_tokens=task.spec.generation.max_new_tokens,
                stop=task.spec.generation.stop,
                pad_id=skeleton.pad_id,
                max_length=max_length,
                batching=batching,
                advance=advance_for(len(prepared)),
            )
            hits = [
                metrics.exact_match(text, example.targets, task.spec.metric)
                for text, example in zip(outputs, task.examples, strict=True)
            ]
            scores = {"exact_match": sum(hits) / len(hits)}
        else:
            requests, owners = prepared
            values = runner.loglikelihoods(
                model,
                requests,
                pad_id=skeleton.pad_id,
                max_length=max_length,
                batching=batching,
                advance=advance_for(len(requests)),
            )
            scores = _reduce(task, [v for v, _ in values], requests, owners)
    n = len(task.examples)
    return TaskResult(
        task.name,
        kind,
        task.primary,
        scores,
        n,
        task.lower_is_better,
        time.perf_counter() - started,
    )


def encode_pair(
    tokenizer: Any, context: str, continuation: str, prefix_id: int
) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split where the context ends.

    Spaces at the end of the context move to the continuation, and the pair is tokenised
    together, so the continuation's tokens are the ones the model would see in running text.
    An empty context becomes the prefix token (BOS, else EOS).
    """
    if not context:
        return [prefix_id], encode_text(tokenizer, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_text(tokenizer, context + continuation)
    split = len(encode_text(tokenizer, context))
    return whole[:split], whole[split:]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (as lm-eval's Hugging Face model encodes)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat(skeleton: Skeleton) -> Callable[[list[dict[str, str]]], str] | None:
    tokenizer = skeleton.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda messages: str(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def _prepare(skeleton: Skeleton, task: Task, max_length: int) -> Any:
    """Token ids of every forward-pass item of ``task`` (computed once per skeleton)."""
    tokenizer, prefix = skeleton.tokenizer, skeleton.prefix_id
    chat = _chat(skeleton) if task.spec.chat_template else None
    if task.kind == "exact_match":
        contexts = [context_text(task, example, chat) for example in task.examples]
        return [encode_text(tokenizer, text) or [prefix] for text in contexts]
    requests: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []  # the example each request belongs to
    for number, example in enumerate(task.examples):
        if task.kind == "multiple_choice":
            context = context_text(task, example, chat)
            for choice in example.choices:
                requests.append(encode_pair(tokenizer, context, choice, prefix))
                owners.append(number)
        else:  # perplexity, bits_per_byte: the rendered prompt is the document
            tokens = encode_text(tokenizer, example.query)
            for window in runner.rolling_windows(tokens, prefix, max_length):
                requests.append(window)
                owners.append(number)
    return requests, owners


def _reduce(
    task: Task,
    values: list[float],
    requests: list[tuple[list[int], list[int]]],
    owners: list[int],
) -> dict[str, float]:
    """Per-request log-likelihoods summed per example, then the task's metric."""
    per_example: list[list[float]] = [[] for _ in task.examples]
    tokens = [0] * len(task.examples)
    for value, (_, continuation), owner in zip(values, requests, owners, strict=True):
        per_example[owner].append(value)
        tokens[owner] += len(continuation)
    if task.kind == "multiple_choice":
        return metrics.choice_scores(
            per_example,
            [example.choices for example in task.examples],
            [example.label if example.label is not None else -1 for example in task.examples],
        )
    return metrics.perplexity_scores(
        [sum(v) for v in per_example],
        tokens,
        [len(example.query.encode()) for example in task.examples],
    )


def _classification(
    skeleton: Skeleton,
    task: Task,
    batching: runner.Batching,
    max_length: int,
    advance_for: Callable[[int], runner.Advance | None],
) -> dict[str, float]:
    assert task.head is not None
    model, id2label = skeleton.classifier(task.head, task.name)
    count = int(model.config.num_labels)
    names = task.spec.labels or [str(id2label.get(i, i)) for i in range(count)]
    if len(names) != count:
        raise TaskError(
            f"task '{task.name}': labels has {len(names)} names but head model '{task.head}' "
            f"has {count} classes"
        )
    labels = [
        label_index(example.targets[0], names, f"task '{task.name}': target, row {number}")
        for number, example in enumerate(task.examples)
    ]
    inputs = [
        list(skeleton.tokenizer(example.query)["input_ids"])[:max_length] or [skeleton.prefix_id]
        for example in task.examples
    ]
    predictions = runner.classify(
        model,
        inputs,
        pad_id=skeleton.pad_id,
        batching=batching,
        advance=advance_for(len(inputs)),
    )
    return metrics.classification_scores(predictions, labels)
