"""Metrics: pure functions from model outputs (texts, log-likelihoods, predictions) to scores.

Nothing here touches a model; the runner produces the numbers, these functions reduce them.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from alloykit.evaluation.tasks import MetricSpec, Normalize

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, options: Normalize) -> str:
    """``text`` with the task's normalisation applied; surrounding whitespace always stripped.

    Order: strip, lower-case, remove ``regexes_to_ignore``, punctuation, whitespace, strip.

    Example:
        >>> normalize_text(" The Answer! ", Normalize(ignore_case=True, ignore_punctuation=True))
        'the answer'
    """
    text = text.strip()
    if options.ignore_case:
        text = text.lower()
    for pattern in options.regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if options.ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    if options.ignore_whitespace:
        text = "".join(text.split())
    return text.strip()


def extract_answer(text: str, pattern: str | None, which: str = "first") -> str:
    """The part of a prediction the regex ``pattern`` selects: its group 1, else the whole match.

    Without a pattern the text is returned as is; without a match the result is ``""``.

    Example:
        >>> extract_answer("so 12, then 34", "([0-9]+)", "last")
        '34'
    """
    if pattern is None:
        return text
    matches = list(re.finditer(pattern, text))
    if not matches:
        return ""
    match = matches[0] if which == "first" else matches[-1]
    return match.group(1) if match.groups() else match.group(0)


def exact_match(prediction: str, targets: Sequence[str], metric: MetricSpec) -> float:
    """1.0 when the extracted, normalised prediction equals any normalised target, else 0.0."""
    answer = normalize_text(
        extract_answer(prediction, metric.extract, metric.extract_match), metric.normalize
    )
    return float(any(answer == normalize_text(t, metric.normalize) for t in targets))


def choice_scores(
    loglikelihoods: Sequence[Sequence[float]],
    choices: Sequence[Sequence[str]],
    labels: Sequence[int],
) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of multiple-choice items.

    ``acc``: the choice with the highest summed log-likelihood is right. ``acc_norm``: the same
    with each log-likelihood divided by its choice's length in UTF-8 bytes, so long answers are
    not penalised for having more tokens.
    """
    right = right_norm = 0
    for scores, texts, label in zip(loglikelihoods, choices, labels, strict=True):
        right += _argmax(scores) == label
        per_byte = [s / max(len(t.encode()), 1) for s, t in zip(scores, texts, strict=True)]
        right_norm += _argmax(per_byte) == label
    n = max(len(labels), 1)
    return {"acc": right / n, "acc_norm": right_norm / n}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of ties, like numpy


def perplexity_scores(
    loglikelihoods: Sequence[float], tokens: Sequence[int], nbytes: Sequence[int]
) -> dict[str, float]:
    """Corpus perplexity and bits per byte from per-document sums.

    ``perplexity = exp(-Σ log p / Σ tokens)`` (token-weighted over all documents);
    ``bits_per_byte = -Σ log p / (ln 2 · Σ bytes)``, comparable across tokenizers.
    """
    total = sum(loglikelihoods)
    count = max(sum(tokens), 1)
    return {
        "perplexity": math.exp(-total / count),
        "bits_per_byte": -total / (math.log(2) * max(sum(nbytes), 1)),
        "tokens": float(sum(tokens)),
    }


def classification_scores(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean over the classes present of each class's F1)."""
    n = max(len(labels), 1)
    accuracy = sum(p == y for p, y in zip(predictions, labels, strict=True)) / n
    f1s = []
    for cls in sorted(set(labels) | set(predictions)):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == cls and y != cls for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != cls and y == cls for p, y in zip(predictions, labels, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"acc": accuracy, "macro_f1": sum(f1s) / max(len(f1s), 1)}
