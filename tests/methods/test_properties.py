"""Every registered method's declared properties hold (registry.PROPERTIES says what each means).

Each method runs through its registry adapter at its default parameters (a required global
parameter takes a value inside its range), in float64, with a seeded generator.
"""

from __future__ import annotations

import pytest
import torch

from alloykit.methods import METHODS, Method, MethodInputs
from alloykit.methods.registry import PROPERTIES

SHAPE = (6, 9)
UNEQUAL = (0.5, 0.3, 0.2)  # sums to one


def model_count(method: Method) -> int:
    limit = method.max_models if method.max_models is not None else 3
    return max(method.min_models, min(3, limit))


def global_params(method: Method) -> dict[str, object]:
    params: dict[str, object] = {}
    for param in method.params:
        if param.per_model:
            continue
        if param.default is not None:
            params[param.name] = param.default
        elif param.low is not None and param.high is not None:
            params[param.name] = param.low + 0.3 * (param.high - param.low)
        else:
            params[param.name] = 0.3
    return params


def per_model_params(method: Method, weights: tuple[float, ...]) -> dict[str, torch.Tensor]:
    values = {}
    for param in method.params:
        if param.per_model:
            default = weights if param.default is None else (param.default,) * len(weights)
            values[param.name] = torch.tensor(default, dtype=torch.float64)
    return values


def run(
    method: Method,
    tensors: torch.Tensor,
    base: torch.Tensor | None,
    weights: tuple[float, ...],
) -> torch.Tensor:
    inputs = MethodInputs(
        tensors.clone(),
        None if method.base == "input" or base is None else base.clone(),
        per_model_params(method, weights),
        global_params(method),
        torch.Generator().manual_seed(0),
    )
    return method.run(inputs)


def declared(prop: str) -> list[str]:
    return sorted(name for name, m in METHODS.items() if prop in m.properties)


def test_every_declared_property_is_known() -> None:
    for name, method in METHODS.items():
        assert method.properties <= set(PROPERTIES), name


@pytest.mark.parametrize("name", declared("idempotent"))
def test_identical_models_give_the_model(name: str) -> None:
    method = METHODS[name]
    k = model_count(method)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = run(method, x.expand(k, *SHAPE), x, (1 / k,) * k)
    torch.testing.assert_close(out, x, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", declared("constant"))
def test_a_constant_is_kept_when_weights_sum_to_one(name: str) -> None:
    method = METHODS[name]
    k = model_count(method)
    weights = tuple(w / sum(UNEQUAL[:k]) for w in UNEQUAL[:k])
    c = torch.full(SHAPE, 0.37, dtype=torch.float64)
    out = run(method, c.expand(k, *SHAPE), c, weights)
    torch.testing.assert_close(out, c, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", declared("symmetric"))
def test_model_order_does_not_matter(name: str) -> None:
    method = METHODS[name]
    k = model_count(method)
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(SHAPE, dtype=torch.float64, generator=generator)
    tensors = base + 0.1 * torch.randn((k, *SHAPE), dtype=torch.float64, generator=generator)
    weights = UNEQUAL[:k]
    forward = run(method, tensors, base, weights)
    backward = run(method, tensors.flip(0), base, tuple(reversed(weights)))
    torch.testing.assert_close(forward, backward, rtol=1e-9, atol=1e-12)
