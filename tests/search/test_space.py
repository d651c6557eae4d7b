"""The search file and its space: paths, gradients, filters, categorical values, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from alloykit.config import evaluate_setting, load_config
from alloykit.search import SearchError, load_search
from alloykit.search.space import parse_path

TEMPLATE = """\
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: ft2
    parameters: {weight: 1.0, density: 0.5}
"""


def _search(tmp_path: Path, space: str, template: str = TEMPLATE) -> Path:
    for name in ("base", "ft1", "ft2"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "template.yml").write_text(template)
    (tmp_path / "t.yml").write_text("data: {validation: v.jsonl}\nprompt: x\nmetric: perplexity\n")
    path = tmp_path / "search.yml"
    path.write_text(
        f"template: template.yml\nspace:\n{space}objective:\n  tasks:\n    - task: t.yml\n"
    )
    return path


def test_paths_parse_and_stars_expand_over_models(tmp_path: Path) -> None:
    assert parse_path("models[1].parameters.weight") == ["models", 1, "parameters", "weight"]
    assert parse_path("slices[*].sources[0]") == ["slices", "*", "sources", 0]
    search = load_search(
        _search(tmp_path, "  - {param: 'models[*].parameters.weight', low: 0, high: 2}\n")
    )
    assert search.space.names == ["models[0].parameters.weight", "models[1].parameters.weight"]
    config = search.space.config(dict.fromkeys(search.space.names, 0.25))
    assert [m["parameters"]["weight"] for m in config["models"]] == [0.25, 0.25]
    # local model folders are made absolute, relative to the template
    assert config["base_model"] == str((tmp_path / "base").resolve())


def test_layer_gradients_filters_and_choices_become_valid_configs(tmp_path: Path) -> None:
    space = (
        "  - {param: 'models[0].parameters.weight', low: 0, high: 1, layers: 3}\n"
        "  - {param: 'models[1].parameters.density', low: 0.1, high: 1, filter: mlp}\n"
        "  - {param: parameters.lambda, low: 0.5, high: 2, log: true}\n"
        "  - {param: merge_method, choices: [ties, dare_ties]}\n"
    )
    search = load_search(_search(tmp_path, space))
    names = search.space.names
    assert names[:3] == [f"models[0].parameters.weight#{k}" for k in range(3)]
    assert names[3] == "models[1].parameters.density@mlp"
    params = dict(zip(names, [0.0, 1.0, 0.5, 0.3, 1.0, "dare_ties"], strict=True))
    config = search.space.config(params)
    load_config(config)  # a valid merge config
    weight = config["models"][0]["parameters"]["weight"]
    assert weight == [0.0, 1.0, 0.5]
    assert evaluate_setting(weight, "x", 0.25) == pytest.approx(0.5)  # interpolated per layer
    density = config["models"][1]["parameters"]["density"]
    assert density == [{"filter": "mlp", "value": 0.3}, {"filter": None, "value": 0.5}]
    assert evaluate_setting(density, "model.layers.0.mlp.up_proj.weight", 0) == 0.3
    assert evaluate_setting(density, "model.layers.0.self_attn.q_proj.weight", 0) == 0.5
    assert config["merge_method"] == "dare_ties"
    assert config["parameters"]["lambda"] == 1.0


def test_unit_cube_points_map_onto_ranges() -> None:
    from alloykit.search.space import Dimension

    log = Dimension("x", ("x",), low=0.01, high=1.0, log=True)
    assert log.from_unit(0.5) == pytest.approx(0.1)
    stepped = Dimension("y", ("y",), low=0.0, high=1.0, step=0.25)
    assert stepped.from_unit(0.6) == 0.5
    assert Dimension("n", ("n",), low=1, high=4, integer=True).from_unit(1.0) == 4
    assert Dimension("c", ("c",), choices=("a", "b", "c")).from_unit(0.999) == "c"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("  - {param: 'models[5].parameters.weight', low: 0, high: 1}\n", "has 2 entries"),
        ("  - {param: 'models[0].parameters.weight', low: 1, high: 0}\n", "space.0: high 0"),
        ("  - {param: 'models[0].parameters.density', low: 0, high: 3}\n", "every high value"),
        ("  - {param: 'models[0].parameters.weight', low: 0}\n", "needs low and high"),
        ("  - {param: 'a..b', low: 0, high: 1}\n", "is not a YAML path"),
    ],
)
def test_bad_search_files_name_the_field(tmp_path: Path, space: str, message: str) -> None:
    with pytest.raises(SearchError, match="search file") as error:
        load_search(_search(tmp_path, space))
    assert message in str(error.value)
    assert "\n" not in str(error.value)
