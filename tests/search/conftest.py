"""The tiny search problem, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.search.problem import make_problem


@pytest.fixture(scope="session")
def problem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models, task files a.yml and b.yml (validation and test splits), in one folder."""
    root = tmp_path_factory.mktemp("problem")
    make_problem(root)
    return root
