"""``alloykit lora merge``: cat is the exact sum of updates; methods act on B·A, never A and B."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit.errors import AlloyError, ConfigError, IncompatibleModels
from alloykit.io.checkpoint import Checkpoint
from alloykit.lora import read_adapter
from alloykit.lora.merge import LoraMergeOptions, merge_adapters
from alloykit.pipeline import merge_to_state_dict
from alloykit.toymodels import ToySpec, make_family
from tests.lora.conftest import load_model, logits, make_adapter, merged_dense


@pytest.fixture(scope="module")
def adapters(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters of the toy base: mixed ranks and modules, one rank-stabilised."""
    root = tmp_path_factory.mktemp("adapters")
    first = make_adapter(
        family["base"],
        root / "first",
        seed=1,
        modules_to_save=["model.norm"],
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"model.layers.0.self_attn.v_proj": 2},
    )
    second = make_adapter(
        family["base"],
        root / "second",
        seed=2,
        r=6,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "k_proj"],
        modules_to_save=["model.norm"],
    )
    dense = {
        name: merged_dense(family["base"], folder, root / f"dense-{name}")
        for name, folder in (("first", first), ("second", second))
    }
    return {"first": first, "second": second, **{f"dense-{k}": v for k, v in dense.items()}}


def _recipe(method: str, adapters: dict[str, Path], **extra: object) -> dict[str, object]:
    models = [
        {"model": str(adapters["first"]), "parameters": {"weight": 1.0, **extra.pop("first", {})}},
        {
            "model": str(adapters["second"]),
            "parameters": {"weight": 0.5, **extra.pop("second", {})},
        },
    ]
    return {"merge_method": method, "models": models, **extra}


def _updates(folder: Path) -> dict[str, torch.Tensor]:
    adapter = read_adapter(folder)
    return {f"{m}.weight": adapter.update(m) for m in adapter.modules}


def test_cat_is_the_exact_sum_of_updates(
    family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    result = merge_adapters(_recipe("cat", adapters), tmp_path / "cat")
    first, second = read_adapter(adapters["first"]), read_adapter(adapters["second"])
    merged = read_adapter(tmp_path / "cat")
    for module in set(first.modules) | set(second.modules):
        expected = torch.zeros_like(merged.update(module))
        if module in first.modules:
            expected += first.update(module)
        if module in second.modules:
            expected += 0.5 * second.update(module)
        torch.testing.assert_close(merged.update(module), expected, atol=1e-8, rtol=1e-6)
        ranks = [a.modules[module].rank for a in (first, second) if module in a.modules]
        assert merged.modules[module].rank == sum(ranks)
    assert merged.modules["model.layers.0.self_attn.q_proj"].rank == 4 + 6
    assert merged.modules["model.layers.0.self_attn.v_proj"].rank == 2
    with Checkpoint(family["base"]) as base:
        norm = base.read("model.norm.weight").double()
    expected_norm = (
        norm
        + (first.full["model.norm.weight"] - norm)
        + 0.5 * (second.full["model.norm.weight"] - norm)
    )
    torch.testing.assert_close(
        merged.full["model.norm.weight"].double(), expected_norm, atol=1e-6, rtol=0
    )
    assert all(r.relative_error == 0.0 for r in result.modules)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("task_arithmetic", {}),
        ("ties", {"first": {"density": 0.5}, "second": {"density": 0.7}}),
        ("linear", {}),
    ],
)
def test_full_rank_refactorised_merge_equals_the_dense_merge(
    family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, method: str, extra: dict
) -> None:
    recipe = _recipe(method, adapters, **dict(extra), rank=1000)
    recipe["base_model"] = str(family["base"])
    result = merge_adapters(recipe, tmp_path / "merged")
    assert all(r.rank == r.full_rank and r.relative_error < 1e-6 for r in result.modules)
    # the reference: alloykit merge of PEFT's merge_and_unload models, minus the base
    dense = _recipe(
        method,
        {"first": adapters["dense-first"], "second": adapters["dense-second"]},
        **dict(extra),
    )
    if method != "linear":
        dense["base_model"] = str(family["base"])
    reference = merge_to_state_dict(
        dense,
    )
    with Checkpoint(family["base"]) as base:
        for name, update in _updates(tmp_path / "merged").items():
            expected = reference[name].double() - base.read(name).double()
            torch.testing.assert_close(update, expected, atol=2e-6, rtol=0, msg=name)
    merged = read_adapter(tmp_path / "merged")
    torch.testing.assert_close(
        merged.full["model.norm.weight"], reference["model.norm.weight"], atol=1e-6, rtol=0
    )


def test_task_arithmetic_matches_numpy_and_low_rank_error_is_optimal(
    family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe("task_arithmetic", adapters, rank=3, parameters={"lambda": 0.8})
    result = merge_adapters(recipe, tmp_path / "merged")  # base from base_model_name_or_path
    first, second = read_adapter(adapters["first"]), read_adapter(adapters["second"])
    module = "model.layers.1.self_attn.q_proj"
    dense = 0.8 * (first.update(module).numpy() + 0.5 * second.update(module).numpy())
    s = np.linalg.svd(dense, compute_uv=False)
    optimal = float(np.sqrt((s[3:] ** 2).sum() / (s**2).sum()))
    report = next(r for r in result.modules if r.module == module)
    assert report.rank == 3
    assert report.relative_error == pytest.approx(optimal, rel=1e-5)
    update = read_adapter(tmp_path / "merged").update(module).numpy()
    assert np.linalg.norm(update - dense) / np.linalg.norm(dense) == pytest.approx(
        optimal, rel=1e-4
    )


def test_merged_adapter_loads_in_peft(
    family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    merge_adapters(_recipe("cat", adapters), tmp_path / "cat")
    peft_model = PeftModel.from_pretrained(load_model(family["base"]), str(tmp_path / "cat"))
    merged = read_adapter(tmp_path / "cat")
    expected = load_model(family["base"])
    state = expected.state_dict()
    for name, update in _updates(tmp_path / "cat").items():
        state[name] = (state[name].double() + update).float()
    state.update(merged.full)
    expected.load_state_dict(state)
    torch.testing.assert_close(logits(peft_model), logits(expected), atol=1e-5, rtol=0)


def test_merge_errors(family: dict[str, Path], adapters: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cat is exact"):
        merge_adapters(_recipe("cat", adapters, rank=4), tmp_path / "a")
    with pytest.raises(ConfigError, match="cat takes only a weight"):
        merge_adapters(_recipe("cat", adapters, first={"density": 0.5}), tmp_path / "a")
    with pytest.raises(ConfigError, match="rank: 0"):
        merge_adapters(_recipe("ties", adapters, rank=0), tmp_path / "a")
    with pytest.raises(AlloyError, match="rank 0|positive"):
        merge_adapters(_recipe("ties", adapters), tmp_path / "a", LoraMergeOptions(rank=0))
    other = make_family(
        tmp_path / "other", ToySpec(hidden_size=16, intermediate_size=32), finetunes=0
    )
    foreign = make_adapter(other["base"], tmp_path / "foreign")
    recipe = _recipe("cat", {"first": adapters["first"], "second": foreign})
    with pytest.raises(ConfigError, match="do not name one base"):
        merge_adapters(recipe, tmp_path / "a")
    recipe["base_model"] = str(family["base"])
    with pytest.raises(IncompatibleModels, match="another base"):
        merge_adapters(recipe, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_recipe_is_checked_before_adapters_are_read(tmp_path: Path) -> None:
    recipe = {
        "merge_method": "ties",
        "models": [{"model": str(tmp_path / "missing"), "parameters": {"density": 1.5}}],
    }
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.density: 1.5 is outside"):
        merge_adapters(recipe, tmp_path / "out")


def test_cat_of_embedding_and_head_adapters_loads_in_peft(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    targets = ["q_proj", "embed_tokens", "lm_head"]
    first = make_adapter(family["base"], tmp_path / "first", seed=3, target_modules=targets)
    second = make_adapter(family["base"], tmp_path / "second", seed=4, target_modules=targets, r=2)
    recipe = {"merge_method": "cat", "models": [{"model": str(first)}, {"model": str(second)}]}
    merge_adapters(recipe, tmp_path / "cat")
    merged = read_adapter(tmp_path / "cat")
    assert merged.modules["model.embed_tokens"].kind == "embedding"
    assert merged.modules["model.embed_tokens"].rank == 6
    expected = load_model(family["base"])
    state = expected.state_dict()
    for name, update in _updates(tmp_path / "cat").items():
        state[name] = (state[name].double() + update).float()
    expected.load_state_dict(state)
    peft_model = PeftModel.from_pretrained(load_model(family["base"]), str(tmp_path / "cat"))
    torch.testing.assert_close(logits(peft_model), logits(expected), atol=1e-5, rtol=0)
