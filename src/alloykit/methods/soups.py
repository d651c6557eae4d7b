"""Greedy model soup: average fine-tunes one at a time, keeping each that does not hurt.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, arXiv:2203.05482, recipe "greedy
soup": sort the ingredients by their own held-out score, start the soup with the best, and
add each next ingredient to the uniform average if the average's score does not drop.

The uniform soup (all ingredients averaged) is the registry's ``linear`` with equal weights;
the greedy soup needs a score (a held-out evaluation), so it is a function over whole state
dicts rather than a per-tensor merge method. It holds three state dicts at a time (the running
sum, the candidate under test and their average): candidates may be anything ``load`` turns
into a state dict (names, paths), loaded when needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from alloykit.errors import IncompatibleModels

Candidate = TypeVar("Candidate")
StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class GreedySoup(Generic[Candidate]):
    """The result of :func:`greedy_soup`.

    ``state_dict`` is the uniform average of the ``chosen`` candidates (indices into the
    input, in the order they were added, best first); ``score`` is its score;
    ``individual_scores[i]`` is candidate i's own score.
    """

    state_dict: dict[str, torch.Tensor]
    chosen: tuple[int, ...]
    score: float
    individual_scores: tuple[float, ...]


def greedy_soup(
    candidates: Sequence[Candidate],
    score: Callable[[StateDict], float],
    load: Callable[[Candidate], StateDict] | None = None,
) -> GreedySoup[Candidate]:
    """Greedy soup (Wortsman et al. 2022, arXiv:2203.05482): add while the score does not drop.

    Candidates are ranked by ``score`` (higher is better; ties keep the input order); the soup
    starts as the best one; each next candidate ``c`` joins when
    ``score(mean(soup ∪ {c})) ≥ score(mean(soup))``. Floating tensors are averaged in their
    own dtype (float16/bfloat16 in float32, then cast back); other tensors (integer buffers)
    are taken from the best candidate.

    Args:
        candidates: state dicts, or anything ``load`` maps to one (names, paths).
        score: held-out score of a state dict, higher is better (e.g. validation accuracy).
        load: turns a candidate into its state dict (default: the candidate is one).

    Returns:
        A :class:`GreedySoup`: the averaged state dict, the chosen indices, the scores.

    Raises:
        IncompatibleModels: when a candidate's tensor names or shapes differ from the first's.
        ValueError: when there are no candidates.

    Example:
        >>> models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([9.0])}]
        >>> soup = greedy_soup(models, lambda sd: -abs(float(sd["w"][0]) - 2.0))
        >>> soup.chosen, soup.state_dict["w"]
        ((0, 1), tensor([2.]))
    """
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    to_state: Callable[[Candidate], StateDict] = load or _identity
    individual = tuple(float(score(to_state(candidate))) for candidate in candidates)
    # best first; sorted() is stable, so equal scores keep the input order
    order = sorted(range(len(candidates)), key=lambda index: -individual[index])

    first = to_state(candidates[order[0]])
    total = {name: _working(tensor).clone() for name, tensor in first.items()}
    dtypes = {name: tensor.dtype for name, tensor in first.items()}
    shapes = {name: tensor.shape for name, tensor in first.items()}
    del first  # only the running sum is kept
    chosen = [order[0]]
    best = individual[order[0]]
    for index in order[1:]:
        ingredient = to_state(candidates[index])
        _check_compatible(shapes, ingredient, index)
        trial = _average(total, ingredient, len(chosen), dtypes)
        trial_score = float(score(trial))
        if trial_score >= best:  # the paper: keep it unless held-out accuracy drops
            for name, tensor in ingredient.items():
                if total[name].is_floating_point():
                    total[name] += _working(tensor)
            chosen.append(index)
            best = trial_score
    return GreedySoup(
        state_dict=_average(total, None, len(chosen), dtypes),
        chosen=tuple(chosen),
        score=best,
        individual_scores=individual,
    )


def _identity(candidate: Candidate) -> StateDict:
    if not isinstance(candidate, Mapping):
        raise TypeError("greedy_soup: candidates are not state dicts; pass load=...")
    return candidate


def _working(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in a precision fit for summing (half types in float32)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def _average(
    total: Mapping[str, torch.Tensor],
    extra: StateDict | None,
    count: int,
    dtypes: Mapping[str, torch.dtype],
) -> dict[str, torch.Tensor]:
    """``(total + extra) / (count + 1)`` (or ``total / count`` without ``extra``) per tensor."""
    result = {}
    for name, summed in total.items():
        if not summed.is_floating_point():
            result[name] = summed.clone()
            continue
        mean = summed / count if extra is None else (summed + _working(extra[name])) / (count + 1)
        result[name] = mean.to(dtypes[name])
    return result


def _check_compatible(shapes: Mapping[str, torch.Size], other: StateDict, index: int) -> None:
    if shapes.keys() != other.keys():
        differing = ", ".join(sorted(set(shapes) ^ set(other))[:3])
        raise IncompatibleModels(
            f"greedy_soup: candidate {index} differs from the best one in tensors {differing}; "
            "soups need fine-tunes of one architecture"
        )
    for name, shape in shapes.items():
        if other[name].shape != shape:
            raise IncompatibleModels(
                f"greedy_soup: tensor '{name}' of candidate {index} has shape "
                f"{tuple(other[name].shape)}, the best candidate {tuple(shape)}"
            )
