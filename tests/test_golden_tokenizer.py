"""alloykit against MergeKit 0.1.5 on merges of models whose vocabularies differ.

``tests/golden/mergekit_0.1.5_vocab.json`` holds MergeKit's outputs for
``tests/golden/vocab_configs`` on :func:`alloykit.toymodels.make_vocabulary_family` (made by
``make_golden.py --vocabulary``). MergeKit numbers a union's new tokens differently on every
run, so the token-embedding and LM-head rows are compared after pairing them by token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alloykit import merge_to_state_dict
from alloykit.pipeline import plan_merge
from alloykit.toymodels import make_vocabulary_family
from tests.golden._golden import (
    VOCAB_FAMILY,
    load_vocab_golden,
    render,
    sample_indices,
)

GOLDEN = load_vocab_golden()
# float32 merges of rows of size < 0.15: MergeKit and alloykit round differently (MergeKit sums
# the weighted rows in another order), by at most a float32 step or two
TOLERANCE = 2e-8


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert GOLDEN["family"] == VOCAB_FAMILY
    root = tmp_path_factory.mktemp("vocab-golden")
    make_vocabulary_family(root, **VOCAB_FAMILY)  # type: ignore[arg-type]
    return root


@pytest.mark.parametrize("name", sorted(GOLDEN["configs"]))
def test_matches_mergekit_row_by_token(name: str, models_root: Path) -> None:
    entry = GOLDEN["configs"][name]
    text = render(entry["config"], models_root)
    plan = plan_merge(text)
    assert plan.tokenizer is not None and plan.tokenizer.vocabulary is not None
    ids = plan.tokenizer.vocabulary.token_ids()
    assert sorted(ids) == entry["tokens"]
    assert plan.config is not None and plan.config["vocab_size"] == entry["vocab_size"]
    ours = {k: v.double().numpy() for k, v in merge_to_state_dict(text).items()}
    assert set(ours) == set(entry["tensors"]) | set(entry["rows"])
    for tensor, rows in entry["rows"].items():
        values = ours[tensor]
        assert values.shape[0] == entry["vocab_size"]
        for token, row in rows.items():
            np.testing.assert_allclose(
                values[ids[token]], row, rtol=0, atol=TOLERANCE, err_msg=f"{tensor} {token!r}"
            )
        padding = np.array(entry["padding"][tensor]).reshape(-1, values.shape[1])
        np.testing.assert_allclose(values[len(ids) :], padding, rtol=0, atol=TOLERANCE)
    for tensor, reference in entry["tensors"].items():
        flat = ours[tensor].reshape(-1)
        assert list(ours[tensor].shape) == reference["shape"]
        assert float(np.sqrt(np.sum(flat * flat))) == pytest.approx(reference["norm"], rel=1e-6)
        sample = flat[sample_indices(tensor, flat.size)]
        np.testing.assert_allclose(sample, reference["sample"], rtol=0, atol=1e-6, err_msg=tensor)
