"""alloykit merge --ray: shards written by Ray tasks equal a one-process merge, byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alloykit.distributed import DistributedError
from alloykit.distributed.merge import Fault, ray_shard_runner
from alloykit.pipeline import MergeOptions, merge

SHARD = "30KB"  # the tiny Llama in several shards


def _recipe(tmp_path: Path, family: dict[str, Path], method: str = "ties") -> Path:
    path = tmp_path / f"{method}.yml"
    path.write_text(
        f"merge_method: {method}\n"
        f"base_model: {family['base']}\n"
        "models:\n"
        f"  - model: {family['ft1']}\n"
        "    parameters: {weight: 0.7, density: 0.5}\n"
        f"  - model: {family['ft2']}\n"
        "    parameters: {weight: 0.4, density: 0.6}\n"
        "dtype: float32\n"
    )
    return path


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a model folder (both outputs are named ``model``, as the card says)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(tmp_path: Path) -> list[str]:
    """Staging folders left anywhere under ``tmp_path``."""
    return sorted(p.name for p in tmp_path.rglob("*") if "alloykit-partial" in p.name)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_a_ray_merge_equals_the_one_process_merge_bit_for_bit(
    ray_instance: Any, family: dict[str, Path], tmp_path: Path, method: str
) -> None:
    recipe = _recipe(tmp_path, family, method)
    options = MergeOptions(seed=3, out_shard_size=SHARD)
    serial = merge(recipe, tmp_path / "serial" / "model", options)
    assert len([f for f in serial.files if f.endswith(".safetensors")]) >= 3
    distributed = merge(
        recipe, tmp_path / "ray" / "model", options, shard_runner=ray_shard_runner()
    )
    assert distributed.files == serial.files
    assert _files(tmp_path / "ray" / "model") == _files(tmp_path / "serial" / "model")
    assert distributed.recipe_hash == serial.recipe_hash
    assert _leftovers(tmp_path) == []


def test_a_task_killed_mid_shard_is_retried_to_a_complete_output(
    ray_instance: Any, family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, family)
    options = MergeOptions(seed=1, out_shard_size=SHARD)
    merge(recipe, tmp_path / "serial" / "model", options)
    marker = tmp_path / "killed-once"
    runner = ray_shard_runner(fault=Fault(1, str(marker)))
    merge(recipe, tmp_path / "ray" / "model", options, shard_runner=runner)
    assert marker.exists()  # the first attempt of part 1 did die
    assert _files(tmp_path / "ray" / "model") == _files(tmp_path / "serial" / "model")
    assert _leftovers(tmp_path) == []


def test_a_task_that_always_dies_leaves_no_output_and_one_line(
    ray_instance: Any, family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, family)
    options = MergeOptions(seed=1, out_shard_size=SHARD)
    runner = ray_shard_runner(retries=1, fault=Fault(0))
    with pytest.raises(DistributedError, match=r"failed 2 times") as caught:
        merge(recipe, tmp_path / "ray" / "model", options, shard_runner=runner)
    assert "\n" not in str(caught.value)
    assert "model-00001-of-" in str(caught.value)
    assert not (tmp_path / "ray" / "model").exists()
    assert _leftovers(tmp_path) == []


def test_a_multi_stage_recipe_needs_its_stages_on_disk(
    ray_instance: Any, family: dict[str, Path], tmp_path: Path
) -> None:
    from tests.test_stages import two_stage

    recipe = tmp_path / "stages.yml"
    recipe.write_text(two_stage(family))
    options = MergeOptions(out_shard_size=SHARD)
    with pytest.raises(DistributedError, match=r"stage 'first' is held in memory.*--intermediate"):
        merge(recipe, tmp_path / "memory" / "model", options, shard_runner=ray_shard_runner())
    assert not (tmp_path / "memory" / "model").exists()

    on_disk = MergeOptions(out_shard_size=SHARD, intermediate_dir=tmp_path / "work")
    serial = merge(recipe, tmp_path / "serial" / "model", on_disk)
    merge(recipe, tmp_path / "ray" / "model", on_disk, shard_runner=ray_shard_runner())
    assert _files(tmp_path / "ray" / "model") == _files(serial.output)
    assert _leftovers(tmp_path) == []


def test_cuda_on_a_cluster_without_gpus_is_one_line_not_a_hang(
    ray_instance: Any, family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, family)
    options = MergeOptions(device="cuda", out_shard_size=SHARD)
    with pytest.raises(DistributedError, match="needs a GPU"):
        merge(recipe, tmp_path / "gpu" / "model", options, shard_runner=ray_shard_runner())
    assert not (tmp_path / "gpu" / "model").exists()
    assert _leftovers(tmp_path) == []
