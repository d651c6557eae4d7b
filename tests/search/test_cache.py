"""The search's task-vector cache: written once, memory-mapped, same bits as merging afresh."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from alloykit.pipeline import MergeOptions, merge_in_memory
from alloykit.search import SearchOptions, run_search
from alloykit.search.cache import CACHE_FOLDER, WEIGHTS, TaskVectorCache
from alloykit.toymodels import ToySpec, make_family
from tests.search.problem import write_search

SPEC = ToySpec(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family"), SPEC, finetunes=3, seed=1)


def _config(family: dict[str, Path], method: str, **extra: Any) -> dict[str, Any]:
    params = {"task_arithmetic": {}, "della": {"density": 0.6, "epsilon": 0.1}}.get(
        method, {"density": 0.6}
    )
    weights = (0.7, 1.3, 0.4)
    return {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family[f"ft{i + 1}"]), "parameters": {"weight": w, **params}}
            for i, w in enumerate(weights)
        ],
        **extra,
    }


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("task_arithmetic", {}),
        ("ties", {}),
        ("dare_ties", {}),
        ("dare_linear", {"parameters": {"rescale": True}}),
        ("breadcrumbs_ties", {}),
        ("della", {"parameters": {"lambda": 0.8}}),
        ("magnitude_prune", {"dtype": "bfloat16"}),
    ],
)
def test_a_cached_merge_is_the_same_bits(
    family: dict[str, Path], tmp_path: Path, method: str, extra: dict[str, Any]
) -> None:
    config = _config(family, method, **extra)
    cache = TaskVectorCache(tmp_path / CACHE_FOLDER)
    for seed in (0, 5):  # the random sparsifiers draw the same with and without the cache
        plain = merge_in_memory(config, MergeOptions(seed=seed)).state
        cached = merge_in_memory(config, MergeOptions(seed=seed), task_vectors=cache).state
        assert plain.keys() == cached.keys()
        for name in plain:
            assert torch.equal(plain[name], cached[name]), name
    assert cache.writes == 1
    assert cache.hits > 0


def test_the_cache_holds_x_minus_base_mapped_from_its_file(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from alloykit.io.checkpoint import open_checkpoint

    cache = TaskVectorCache(tmp_path / CACHE_FOLDER)
    merge_in_memory(_config(family, "ties"), MergeOptions(seed=0), task_vectors=cache)
    name = "model.layers.0.mlp.up_proj.weight"
    with open_checkpoint(family["ft2"]) as ft, open_checkpoint(family["base"]) as base:
        expected = ft.read(name).double() - base.read(name).double()
    base_key = (str(family["base"]), name)
    vector = cache.read(str(family["ft2"]), name, base_key, torch.float32, None)
    assert vector is not None
    assert torch.allclose(vector.double(), expected, atol=1e-6, rtol=0)
    if Path("/proc/self/maps").is_file():  # the view lies in a mapping of the cache file
        file = str((tmp_path / CACHE_FOLDER / WEIGHTS).resolve())
        pointer = vector.data_ptr()
        mapped = []
        for line in Path("/proc/self/maps").read_text().splitlines():
            span, *_, path = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in span.split("-"))
            mapped.append(path.strip() == file and low <= pointer < high)
        assert any(mapped)
    # not in the cache: another precision, another model or tensor
    assert cache.read(str(family["ft2"]), name, base_key, torch.float64, None) is None
    assert cache.read(str(family["base"]), name, base_key, torch.float32, None) is None
    cache.remove()
    assert not (tmp_path / CACHE_FOLDER).exists()


def test_other_methods_write_no_cache(family: dict[str, Path], tmp_path: Path) -> None:
    cache = TaskVectorCache(tmp_path / CACHE_FOLDER)
    config = _config(family, "task_arithmetic")
    config["merge_method"] = "linear"
    del config["base_model"]
    merge_in_memory(config, MergeOptions(seed=0), task_vectors=cache)
    assert cache.writes == 0 and not (tmp_path / CACHE_FOLDER).exists()


def test_a_resumed_search_reuses_the_cache_unless_an_input_changed(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(family, "ties")
    first = TaskVectorCache(tmp_path / CACHE_FOLDER)
    expected = merge_in_memory(config, MergeOptions(seed=0), task_vectors=first).state
    first.close()
    again = TaskVectorCache(tmp_path / CACHE_FOLDER)  # a new process after a kill
    state = merge_in_memory(config, MergeOptions(seed=0), task_vectors=again).state
    assert again.writes == 0 and again.hits > 0
    assert all(torch.equal(expected[n], state[n]) for n in expected)
    again.close()
    weights = family["ft1"] / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = TaskVectorCache(tmp_path / CACHE_FOLDER)
    merge_in_memory(config, MergeOptions(seed=0), task_vectors=changed)
    assert changed.writes == 1
    changed.close()


def test_a_search_writes_the_cache_once_and_every_trial_reads_it(
    problem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[Path] = []
    reads: list[int] = []
    original_write = TaskVectorCache._write
    original_read = TaskVectorCache.read

    def counting_write(self: TaskVectorCache, *args: Any) -> None:
        writes.append(self.folder)
        original_write(self, *args)

    def counting_read(self: TaskVectorCache, *args: Any) -> torch.Tensor | None:
        vector = original_read(self, *args)
        reads.append(vector is not None)
        return vector

    monkeypatch.setattr(TaskVectorCache, "_write", counting_write)
    monkeypatch.setattr(TaskVectorCache, "read", counting_read)
    search_file = write_search(problem, "random", 5, name="cache_random.yml")
    out = problem / "cache-search"
    seen: list[tuple[int, int]] = []  # per trial: served task vectors so far, cache file inode

    def on_trial(trial: Any, budget: int) -> None:
        seen.append((sum(reads), (out / CACHE_FOLDER / WEIGHTS).stat().st_ino))

    result = run_search(search_file, out, SearchOptions(threads=1), on_trial=on_trial)
    assert writes == [out / CACHE_FOLDER]  # once per search
    assert len(seen) == 5
    served = [count for count, _ in seen]
    assert all(b > a for a, b in zip([0, *served], served, strict=False))  # every trial read it
    assert len({inode for _, inode in seen}) == 1  # the same file throughout
    assert all(reads)  # every lookup was found
    assert not (out / CACHE_FOLDER).exists()  # removed when the search finished

    plain = run_search(
        search_file, problem / "cache-off", SearchOptions(threads=1, cache_task_vectors=False)
    )
    assert [t.outcome for t in plain.trials] == [t.outcome for t in result.trials]
    assert plain.test == result.test
    assert len(writes) == 1


def test_a_driver_prepares_the_cache_and_workers_reuse_it(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(family, "dare_ties")
    driver = TaskVectorCache(tmp_path / CACHE_FOLDER)
    assert driver.prepare(config) and driver.writes == 1
    worker = TaskVectorCache(tmp_path / CACHE_FOLDER)
    state = merge_in_memory(config, MergeOptions(seed=2), task_vectors=worker).state
    assert worker.writes == 0 and worker.hits > 0
    plain = merge_in_memory(config, MergeOptions(seed=2)).state
    assert all(torch.equal(plain[n], state[n]) for n in plain)
    linear = {k: v for k, v in config.items() if k != "base_model"}
    assert not TaskVectorCache(tmp_path / "other").prepare({**linear, "merge_method": "linear"})
