"""Fixtures of the diagnostics tests: the constructed models, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.inspect.models import write_models


@pytest.fixture(scope="session")
def constructed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{name: folder}`` of every model in :mod:`tests.inspect.models`."""
    return write_models(tmp_path_factory.mktemp("constructed"))
