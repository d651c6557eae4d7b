"""Batched forward passes: log-likelihoods, rolling perplexity windows, greedy generation and
sequence classification, padding-aware, on any device.

Requests are sorted longest first, so the first batch is the largest and an automatic batch
size finds its limit (halving on out-of-memory) before any work is wasted; results come back in
request order. These functions take a loaded model and token ids; they know nothing of tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

Advance = Callable[[int], None]
T = TypeVar("T")
R = TypeVar("R")

AUTO_START = {"cuda": 64, "cpu": 16}  # first batch size tried by --batch-size auto


@dataclass
class Batching:
    """The batch size (``None``: automatic, halved on out-of-memory) and the device."""

    size: int | None
    device: torch.device
    learned: int | None = None  # the automatic size that last fitted; the next run starts there

    def run(
        self,
        items: Sequence[T],
        length: Callable[[T], int],
        fn: Callable[[list[T]], list[R]],
        advance: Advance | None = None,
    ) -> list[R]:
        """``fn`` over batches of ``items`` (longest first); results in the order of ``items``."""
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))
        results: list[Any] = [None] * len(items)
        auto = self.size is None
        size = self.size or self.learned or AUTO_START.get(self.device.type, 16)
        start = 0
        while start < len(order):
            indices = order[start : start + size]
            try:
                outputs = fn([items[i] for i in indices])
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if not auto or size == 1 or "out of memory" not in str(e).lower():
                    raise
                size //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for i, output in zip(indices, outputs, strict=True):
                results[i] = output
            start += len(indices)
            if advance is not None:
                advance(len(indices))
        if auto:
            self.learned = size
        return results


def _padded(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``(batch, longest)``, padded right (or left)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def loglikelihoods(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    max_length: int,
    batching: Batching,
    advance: Advance | None = None,
) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)`` of token ids: ``(Σ log p(continuation | context),
    whether greedy decoding would produce the continuation)``.

    The context is cut on the left so context and continuation fit ``max_length + 1`` tokens
    (the last token is only predicted, never fed). Padding is on the right, so the positions of
    real tokens are unchanged.
    """

    def run(batch: list[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        inputs = [(list(c) + list(x))[-(max_length + 1) :][:-1] for c, x in batch]
        ids, mask = _padded(inputs, pad_id, batching.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits  # (batch, time, vocab)
        out = []
        for row, ((_, continuation), fed) in enumerate(zip(batch, inputs, strict=True)):
            n = len(continuation)
            if n == 0:
                out.append((0.0, True))
                continue
            scores = torch.log_softmax(logits[row, len(fed) - n : len(fed)].float(), dim=-1)
            target = torch.tensor(list(continuation), device=scores.device)
            total = scores.gather(1, target[:, None]).sum().item()
            out.append((float(total), bool((scores.argmax(-1) == target).all())))
        return out

    return batching.run(requests, lambda r: len(r[0]) + len(r[1]), run, advance)


def rolling_windows(
    tokens: Sequence[int], prefix_id: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """A document as ``(context, continuation)`` windows that together score every token once.

    The document is ``[prefix] + tokens``; each window predicts up to ``max_length`` new tokens
    from as many preceding tokens as fit, so every token is predicted from the longest context
    the model allows and the first from the prefix (BOS, else EOS) alone.
    """
    full = [prefix_id, *tokens]
    windows = []
    for start in range(1, len(full), max_length):
        end = min(start + max_length, len(full))
        first = max(0, end - 1 - max_length)
        windows.append((full[first:start], full[start:end]))
    return windows


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str],
    pad_id: int,
    max_length: int,
    batching: Batching,
    advance: Advance | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), cut at the first stop string or EOS.

    Prompts are padded on the left so every row continues from its last real token; a batch
    stops early once every row holds a stop string.
    """
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class _StopStrings(StoppingCriteria):
        def __init__(self, width: int) -> None:
            self.width = width

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
            done = [any(s in text for s in stop) for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
    )

    def run(batch: list[Sequence[int]]) -> list[str]:
        room = max(max_length - max_new_tokens, 1)
        ids, mask = _padded([list(p)[-room:] for p in batch], pad_id, batching.device, left=True)
        criteria = StoppingCriteriaList([_StopStrings(ids.shape[1])] if stop else [])
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=criteria,
            )
        texts = tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
        return [cut_at_stop(text, stop) for text in texts]

    return batching.run(prompts, len, run, advance)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def classify(
    model: Any,
    inputs: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batching: Batching,
    advance: Advance | None = None,
) -> list[int]:
    """The predicted class (argmax of a sequence-classification model's logits) per input."""

    def run(batch: list[Sequence[int]]) -> list[int]:
        ids, mask = _padded(batch, pad_id, batching.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits  # (batch, classes)
        return [int(i) for i in logits.float().argmax(-1).tolist()]

    return batching.run(inputs, len, run, advance)
