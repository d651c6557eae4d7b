"""greedy_soup: a NumPy reading of Wortsman et al. 2022's recipe, with synthetic scores.

Greedy soup (arXiv:2203.05482, Recipe 1): sort the ingredients by held-out accuracy in
decreasing order; soup = [best]; for each next ingredient, if the held-out accuracy of the
average of soup + [ingredient] is at least that of the average of soup, add it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloykit.errors import IncompatibleModels
from alloykit.methods.soups import greedy_soup


def ref_greedy(
    ingredients: list[np.ndarray], accuracy: Callable[[np.ndarray], float]
) -> tuple[list[int], np.ndarray]:
    own = [accuracy(x) for x in ingredients]
    ranked = sorted(range(len(ingredients)), key=lambda i: (-own[i], i))
    soup = [ranked[0]]
    for i in ranked[1:]:
        with_it = np.mean([ingredients[j] for j in [*soup, i]], axis=0)
        without = np.mean([ingredients[j] for j in soup], axis=0)
        if accuracy(with_it) >= accuracy(without):
            soup.append(i)
    return soup, np.mean([ingredients[j] for j in soup], axis=0)


def test_golden_case() -> None:
    # target 2, score = -|w - 2|; candidates 1, 3, 9, 2.5 score -1, -1, -7, -0.5
    # ranked: 2.5 (index 3), 1 (0), 3 (1), 9 (2)
    # soup [2.5]: score -0.5; + 1 -> mean 1.75, -0.25 ≥ -0.5: add; + 3 -> mean 6.5/3 = 2.1667,
    # -0.1667 ≥ -0.25: add; + 9 -> mean 15.5/4 = 3.875, -1.875 < -0.1667: skip
    values = [1.0, 3.0, 9.0, 2.5]
    models = [{"w": torch.tensor([v], dtype=torch.float64)} for v in values]
    soup = greedy_soup(models, lambda sd: -abs(float(sd["w"][0]) - 2.0))
    assert soup.chosen == (3, 0, 1)
    torch.testing.assert_close(soup.state_dict["w"], torch.tensor([6.5 / 3], dtype=torch.float64))
    assert soup.score == pytest.approx(-(6.5 / 3 - 2.0))
    assert soup.individual_scores == (-1.0, -1.0, -7.0, -0.5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 7))
def test_matches_the_recipe_and_never_scores_below_the_best_ingredient(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.standard_normal(5)
    ingredients = [target + rng.standard_normal(5) * rng.uniform(0.1, 3.0) for _ in range(n)]

    def accuracy(x: np.ndarray) -> float:
        return -float(np.sum((x - target) ** 2))

    expected_chosen, expected_soup = ref_greedy(ingredients, accuracy)
    models = [
        {"w": torch.from_numpy(x.reshape(1, 5)), "b": torch.from_numpy(x[:2])} for x in ingredients
    ]
    soup = greedy_soup(models, lambda sd: accuracy(sd["w"].numpy().reshape(5)))
    assert list(soup.chosen) == expected_chosen
    np.testing.assert_allclose(soup.state_dict["w"].numpy().reshape(5), expected_soup, rtol=1e-12)
    np.testing.assert_allclose(soup.state_dict["b"].numpy(), expected_soup[:2], rtol=1e-12)
    assert soup.score >= max(soup.individual_scores)
    assert soup.score == pytest.approx(accuracy(expected_soup))


def test_names_are_loaded_and_dtypes_kept() -> None:
    store = {
        "a": {"w": torch.tensor([0.0, 2.0], dtype=torch.bfloat16), "ids": torch.tensor([0, 1])},
        "b": {"w": torch.tensor([3.0, 2.0], dtype=torch.bfloat16), "ids": torch.tensor([5, 5])},
    }
    loaded: list[str] = []

    def load(name: str) -> dict[str, torch.Tensor]:
        loaded.append(name)
        return store[name]

    # a scores -2, b -1 on its own; their average [1.5, 2] scores -0.5: both are kept
    soup = greedy_soup(
        ["a", "b"], lambda sd: -float((sd["w"].float() - 2.0).abs().sum()), load=load
    )
    assert soup.chosen == (1, 0)
    assert soup.state_dict["w"].dtype == torch.bfloat16
    assert soup.state_dict["w"].tolist() == [1.5, 2.0]
    assert soup.state_dict["ids"].tolist() == [5, 5]  # integer buffers: from the best candidate
    assert set(loaded) == {"a", "b"}


def test_a_dropping_score_keeps_the_best_alone() -> None:
    models = [{"w": torch.tensor([float(v)])} for v in (0.0, 10.0)]
    soup = greedy_soup(models, lambda sd: -(float(sd["w"][0]) ** 2))
    assert soup.chosen == (0,)
    assert soup.state_dict["w"].tolist() == [0.0]


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], lambda sd: 0.0)
    score: Callable[[object], float] = lambda sd: 0.0  # noqa: E731
    with pytest.raises(IncompatibleModels, match="shape"):
        greedy_soup([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], score)
    with pytest.raises(IncompatibleModels, match="tensors"):
        greedy_soup([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], score)
    with pytest.raises(TypeError, match="load"):
        greedy_soup(["a"], score)
