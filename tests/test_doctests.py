"""The Example sections of the docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "alloykit.config",
    "alloykit.io.writer",
    "alloykit.methods.extrapolate",
    "alloykit.methods.linear",
    "alloykit.methods.masks",
    "alloykit.methods.passthrough",
    "alloykit.methods.soups",
    "alloykit.methods.spectral",
    "alloykit.methods.spherical",
    "alloykit.methods.task_vectors",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
