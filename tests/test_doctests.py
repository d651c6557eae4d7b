"""The Example sections of the docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "alloykit.config",
    "alloykit.evaluation.metrics",
    "alloykit.io.writer",
    "alloykit.lora.factorize",
    "alloykit.methods.data_aware",
    "alloykit.methods.extrapolate",
    "alloykit.methods.fusion",
    "alloykit.methods.linear",
    "alloykit.methods.masks",
    "alloykit.methods.model_stock",
    "alloykit.methods.passthrough",
    "alloykit.methods.ram",
    "alloykit.methods.reductions",
    "alloykit.methods.sce",
    "alloykit.methods.soups",
    "alloykit.methods.spectral",
    "alloykit.methods.spherical",
    "alloykit.methods.task_vectors",
    "alloykit.rebasin.matching",
    "alloykit.rebasin.spec",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
