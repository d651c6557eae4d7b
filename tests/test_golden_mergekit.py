"""alloykit against MergeKit 0.1.5 on the same inputs, without installing MergeKit.

``tests/golden/mergekit_0.1.5.json`` holds, for each config in ``tests/golden/configs``, the
float64 norm and a fixed sample of values of every tensor MergeKit wrote (produced once by
``tests/golden/make_golden.py``). Configs whose method alloykit does not have yet are skipped
with that reason; each method's issue turns its configs on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from alloykit import merge_to_state_dict
from alloykit.methods import METHODS
from alloykit.toymodels import ToySpec
from tests.golden._golden import FAMILY, load_golden, render, sample_indices

GOLDEN = load_golden()


@pytest.fixture(scope="module")
def models_root(family: dict[str, Path]) -> Path:
    # the session family is built with exactly the golden inputs' arguments
    assert (
        ToySpec(**FAMILY["spec"]) == ToySpec() and FAMILY["finetunes"] == 3 and FAMILY["seed"] == 0
    )
    return family["base"].parent


@pytest.mark.parametrize("name", sorted(GOLDEN["configs"]))
def test_matches_mergekit(name: str, models_root: Path) -> None:
    entry = GOLDEN["configs"][name]
    config = yaml.safe_load(render(entry["config"], models_root))
    if config["merge_method"] not in METHODS:
        pytest.skip(f"method {config['merge_method']} is not implemented yet")
    ours = {k: v.double().numpy() for k, v in merge_to_state_dict(config).items()}
    expected = entry["tensors"]
    assert set(ours) == set(expected)
    for tensor, reference in expected.items():
        values = ours[tensor]
        assert list(values.shape) == reference["shape"], tensor
        norm = float(np.sqrt(np.sum(values * values)))
        assert norm == pytest.approx(reference["norm"], rel=1e-6), tensor
        flat = values.reshape(-1)
        sample = flat[sample_indices(tensor, flat.size)]
        scale = max(1.0, float(np.abs(flat).max()))
        np.testing.assert_allclose(
            sample, reference["sample"], rtol=0, atol=1e-6 * scale, err_msg=tensor
        )
