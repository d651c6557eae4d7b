"""Multi-stage recipes: documents run in dependency order, intermediates in memory or on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit import MergeOptions, merge, merge_to_state_dict
from alloykit.errors import ConfigError
from alloykit.pipeline import plan_stages
from tests.helpers import load_tensors, run_cli


def two_stage(family: dict[str, Path], *, final_first: bool = False) -> str:
    first = f"""name: first
merge_method: linear
models:
  - model: {family["ft1"]}
    parameters: {{weight: 0.7}}
  - model: {family["ft2"]}
    parameters: {{weight: 0.3}}
dtype: float32
"""
    final = f"""merge_method: task_arithmetic
base_model: {family["base"]}
models:
  - model: first
    parameters: {{weight: 1.0}}
  - model: {family["ft3"]}
    parameters: {{weight: 0.5}}
dtype: float32
"""
    return "---\n".join([final, first] if final_first else [first, final])


def expected(family: dict[str, Path]) -> dict[str, np.ndarray]:
    base, ft1, ft2, ft3 = (load_tensors(family[k]) for k in ("base", "ft1", "ft2", "ft3"))
    return {
        n: base[n] + (0.7 * ft1[n] + 0.3 * ft2[n] - base[n]) + 0.5 * (ft3[n] - base[n])
        for n in base
    }


@pytest.mark.parametrize("final_first", [False, True])
def test_two_stages_in_memory_match_the_formula(family: dict[str, Path], final_first: bool) -> None:
    state = merge_to_state_dict(two_stage(family, final_first=final_first))
    for name, value in expected(family).items():
        np.testing.assert_allclose(state[name].double().numpy(), value, rtol=0, atol=1e-6)


def test_intermediate_dir_gives_the_same_model_and_keeps_the_stage(
    family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = tmp_path / "stages.yml"
    recipe.write_text(two_stage(family))
    in_memory = merge(recipe, tmp_path / "a")
    on_disk = merge(recipe, tmp_path / "b", MergeOptions(intermediate_dir=tmp_path / "work"))
    assert (tmp_path / "work" / "first" / "model.safetensors").is_file()
    a, b = load_tensors(in_memory.output), load_tensors(on_disk.output)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    # the written recipe holds both documents and runs again to the same bytes
    again = merge(in_memory.output / "alloykit_config.yml", tmp_path / "c")
    assert again.recipe_hash == in_memory.recipe_hash
    assert (again.output / "model.safetensors").read_bytes() == (
        in_memory.output / "model.safetensors"
    ).read_bytes()


def test_dry_run_plans_every_stage_without_reading(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alloykit.io.checkpoint import Checkpoint

    def forbidden(*args: object) -> torch.Tensor:
        raise AssertionError("a dry run read a tensor")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    stages = plan_stages(two_stage(family))
    assert [name for name, _ in stages] == ["first", "final"]
    final = stages[1][1]
    assert {i.model for j in final.jobs for i in j.inputs} == {"first", str(family["ft3"])}


def test_cli_dry_run_prints_each_stage(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "stages.yml"
    recipe.write_text(two_stage(family))
    result = run_cli("merge", recipe, tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "stage first" in result.stdout and "stage final" in result.stdout


def test_hierarchical_pairwise_slerp(family: dict[str, Path]) -> None:
    from alloykit.methods.spherical import slerp

    text = "---\n".join(
        [
            f"name: a\nmerge_method: slerp\nbase_model: {family['ft1']}\nmodels: [{{model: {family['ft2']}}}]\nparameters: {{t: 0.5}}\n",
            f"name: b\nmerge_method: slerp\nbase_model: {family['ft3']}\nmodels: [{{model: {family['base']}}}]\nparameters: {{t: 0.3}}\n",
            "merge_method: slerp\nbase_model: a\nmodels: [{model: b}]\nparameters: {t: 0.5}\n",
        ]
    )
    state = merge_to_state_dict(text)
    ft1, ft2, ft3, base = (load_tensors(family[k]) for k in ("ft1", "ft2", "ft3", "base"))
    name = "model.layers.1.mlp.down_proj.weight"
    t = {
        k: torch.from_numpy(v[name]).float()
        for k, v in (("ft1", ft1), ("ft2", ft2), ("ft3", ft3), ("base", base))
    }
    want = slerp(slerp(t["ft1"], t["ft2"], 0.5), slerp(t["ft3"], t["base"], 0.3), 0.5)
    torch.testing.assert_close(state[name], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        (
            ["merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"] * 2,
            "only the final document may have no name",
        ),
        (
            ["name: x\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"] * 2
            + ["merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n"],
            "documents[1].name: 'x' is also documents[0]",
        ),
        (
            [
                "name: x\nmerge_method: linear\nmodels: [{model: y, parameters: {weight: 1}}]\n",
                "name: y\nmerge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n",
                "merge_method: linear\nmodels: [{model: y, parameters: {weight: 1}}]\n",
            ],
            "depends on itself",
        ),
        (
            [
                "name: x\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n",
                "merge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n",
            ],
            "stages ['x'] are not used by the final document",
        ),
        (
            [
                "name: x\nmerge_method: lineer\nmodels: [{model: a, parameters: {weight: 1}}]\n",
                "merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n",
            ],
            "documents[0].merge_method: unknown method 'lineer'",
        ),
    ],
)
def test_stage_errors(documents: list[str], message: str) -> None:
    from alloykit.stages import load_stages

    with pytest.raises(ConfigError) as info:
        load_stages("---\n".join(documents))
    assert message in str(info.value)
