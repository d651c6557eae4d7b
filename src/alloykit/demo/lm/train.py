"""Skill experts of a causal LM: a full fine-tune and a LoRA fine-tune per skill, cached.

Each expert is trained on (prompt, answer) pairs of one skill (:mod:`alloykit.demo.lm.data`)
with the loss on the answer tokens only (prompt tokens masked), AdamW, linear warm-up then
linear decay, a fixed seed, and the batch order drawn from that seed. To keep a CPU step
cheap, the output projection (49k-word vocabulary) is applied to the answer positions only,
not to every position of the sequence: the same loss, a fraction of the work.

- ``full``: every weight is trained; the expert is a float32 Hugging Face folder (fine-tune
  deltas are far below bfloat16's resolution of the base weights, so float32 is kept).
- ``lora``: LoRA (Hu et al., 2021, arXiv:2106.09685) on the attention and MLP projections
  with PEFT; the expert is the PEFT adapter folder and, beside it, the dense model with the
  update folded in (``W + scale * B A``), so both merge routes can start from it.

A cache entry is named by a hash of the skill's rows, the base model folder and the
configuration, and is written atomically (a finished folder or none).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.demo.lm.base import LMProtocolError
from alloykit.demo.lm.data import QA, training_text

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (fixed before any test score is seen)."""

    method: str = "full"  # full | lora
    steps: int = 150
    batch_size: int = 16
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.0
    max_length: int = 64
    seed: int = 0
    threads: int = 2
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS)

    def key(self) -> str:
        """The hash of the settings that change the trained weights (not ``threads``)."""
        settings = {k: v for k, v in asdict(self).items() if k != "threads"}
        if self.method != "lora":
            settings = {k: v for k, v in settings.items() if not k.startswith("lora_")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def encode_examples(
    tokenizer: Any, rows: Sequence[QA], max_length: int
) -> list[tuple[list[int], int]]:
    """Each row as (token ids, prompt length): the prompt encoded alone, as the evaluator
    encodes it before generating, then the answer; cut to ``max_length`` from the left."""
    out = []
    for row in rows:
        prompt, completion = training_text(row)
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        answer_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        ids = (prompt_ids + answer_ids)[-max_length:]
        out.append((ids, max(len(ids) - len(answer_ids), 0)))
    return out


def collate(
    batch: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (tokens, prompt_length) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, prompt_length : len(tokens)] = torch.tensor(tokens[prompt_length:])
    return ids, mask, labels


def answer_loss(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens, the output projection applied to
    the positions that predict them only."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    chosen = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][chosen])
    return torch.nn.functional.cross_entropy(logits.float(), targets[chosen])


def batches(count: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of row indices: epochs of seeded permutations, cut into batches."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(count))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _schedule(step: int, config: TrainConfig) -> float:
    warm = max(int(config.steps * config.warmup), 1)
    if step < warm:
        return (step + 1) / warm
    return max(config.steps - step, 0) / max(config.steps - warm, 1)


def finetune(
    base: Path, rows: Sequence[QA], config: TrainConfig, log: Any = print
) -> tuple[Any, Any, dict[str, float]]:
    """Fine-tune ``base`` on ``rows``; returns (model, tokenizer, timing). ``model`` is a
    transformers model (full) or a PEFT model (lora), in float32, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.method not in ("full", "lora"):
        raise LMProtocolError(f"unknown fine-tuning method '{config.method}'; full or lora")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.lora_targets),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = encode_examples(tokenizer, rows, config.max_length)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config))
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    for step, indices in enumerate(
        batches(len(examples), config.batch_size, config.steps, config.seed)
    ):
        ids, mask, labels = collate([examples[i] for i in indices], pad_id)
        loss = answer_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == config.steps - 1:
            elapsed = time.perf_counter() - started
            log(
                f"step {step + 1}/{config.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} ({elapsed / (step + 1):.2f} s/step)"
            )
    seconds = time.perf_counter() - started
    model.eval()
    timing = {
        "seconds": seconds,
        "seconds_per_step": seconds / config.steps,
        "final_loss": sum(losses[-10:]) / min(len(losses), 10),
    }
    if not math.isfinite(timing["final_loss"]):
        raise LMProtocolError(f"fine-tuning diverged (loss {timing['final_loss']}); lower lr")
    return model, tokenizer, timing


def rows_digest(rows: Sequence[QA]) -> str:
    """A short hash of training rows (part of every expert's cache key)."""
    payload = json.dumps([[r.question, r.answer] for r in rows])
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def expert_dir(cache: Path, module: str, rows: Sequence[QA], config: TrainConfig) -> Path:
    """The cache folder of one expert: ``experts/<module>-<method>-<config hash>-<rows hash>``."""
    name = f"{module}-{config.method}-{config.key()}-{rows_digest(rows)}"
    return cache / "experts" / name


def get_expert(
    cache: Path, base: Path, module: str, rows: Sequence[QA], config: TrainConfig, log: Any = print
) -> Path:
    """The expert's cache folder, fine-tuned and written there first if absent.

    The folder holds ``model/`` (a Hugging Face model: the full fine-tune, or for LoRA the
    base with the adapter folded in), ``adapter/`` (LoRA only: the PEFT adapter) and
    ``train.json`` (configuration, timing, machine).
    """
    import platform

    from alloykit.io.writer import OutputFolder

    folder = expert_dir(cache, module, rows, config)
    if (folder / "train.json").is_file():
        return folder
    model, tokenizer, timing = finetune(base, rows, config, log)
    with OutputFolder(folder, overwrite=True) as out:
        if config.method == "lora":
            model.save_pretrained(out.path / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(out.path / "model")
        tokenizer.save_pretrained(out.path / "model")
        record = {
            "module": module,
            "base": str(base),
            "rows": len(rows),
            "config": asdict(config),
            "timing": timing,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        }
        (out.path / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        out.commit()
    return folder
