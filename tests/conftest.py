"""Shared fixtures: tiny deterministic model families, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from alloykit.toymodels import ToySpec, make_family

# Property tests draw the same examples on every run (the suite is deterministic); set
# HYPOTHESIS_PROFILE=explore to draw fresh random examples while hunting for bugs.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft1, ft2, ft3: tiny Llama models, float32, single model.safetensors each."""
    return make_family(tmp_path_factory.mktemp("family"), ToySpec(), finetunes=3, seed=0)


@pytest.fixture(scope="session")
def sharded_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same values as ``family``, written in many shards with an index (bfloat16)."""
    spec = ToySpec(dtype="bfloat16")
    return make_family(tmp_path_factory.mktemp("sharded"), spec, finetunes=2, max_shard_size="20KB")


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models with tie_word_embeddings: no lm_head tensor is stored."""
    spec = ToySpec(tie_word_embeddings=True)
    return make_family(tmp_path_factory.mktemp("tied"), spec, finetunes=2)
