"""One small local Ray instance for every distributed test (started once: it takes seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import alloykit

WORKERS = 2


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[Any]:
    """A local Ray instance with two worker CPUs and a 100 MB object store, shut down after."""
    ray = pytest.importorskip("ray")
    source = str(Path(alloykit.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [source, path]))
    ray.init(
        num_cpus=WORKERS,
        object_store_memory=100 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        if path:
            os.environ["PYTHONPATH"] = path
        else:
            os.environ.pop("PYTHONPATH", None)


@pytest.fixture(scope="session")
def problem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe-search test problem (tests/search/problem.py), built once."""
    from tests.search.problem import make_problem

    root = tmp_path_factory.mktemp("problem")
    make_problem(root)
    return root
