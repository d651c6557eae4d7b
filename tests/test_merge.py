"""End-to-end merges of tiny Llama checkpoints, checked against NumPy float64 references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alloykit import MergeOptions, load_config, merge, merge_to_state_dict, plan_merge, recipe_hash
from alloykit.architecture import split_layer_name
from tests.helpers import load_tensors

NUM_LAYERS = 4


def assert_loads_cleanly(folder: Path) -> None:
    """transformers loads the folder with no missing, unexpected or mismatched keys."""
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def layer_fraction(name: str) -> float:
    parts = split_layer_name(name)
    return 0.0 if parts is None else parts.index / (NUM_LAYERS - 1)


def test_linear_matches_float64_reference_and_loads(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 1.0}},
            {"model": str(family["ft2"]), "parameters": {"weight": [0.0, 1.0]}},  # gradient
            {
                "model": str(family["ft3"]),
                "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]},
            },
        ],
    }
    result = merge(config, tmp_path / "out")
    assert_loads_cleanly(result.output)
    out = load_tensors(result.output)
    inputs = {k: load_tensors(family[k]) for k in ("ft1", "ft2", "ft3")}
    assert set(out) == set(inputs["ft1"])
    for name, value in out.items():
        weights = np.array([1.0, layer_fraction(name), 2.0 if "mlp" in name else 0.5])
        stacked = np.stack([inputs[k][name] for k in ("ft1", "ft2", "ft3")])
        expected = np.tensordot(weights, stacked, axes=1) / weights.sum()
        np.testing.assert_allclose(
            value, expected, rtol=0, atol=2e-7 * max(1, np.abs(expected).max()), err_msg=name
        )


def test_task_arithmetic_sharded_bf16_in_and_out(
    sharded_family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(sharded_family["base"]),
        "models": [
            {"model": str(sharded_family["ft1"]), "parameters": {"weight": 1.0}},
            {"model": str(sharded_family["ft2"]), "parameters": {"weight": -0.5}},
        ],
        "parameters": {"lambda": 0.8},
    }
    result = merge(config, tmp_path / "out", MergeOptions(out_shard_size="30KB"))
    index = json.loads((result.output / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in result.output.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == result.plan.output_bytes
    assert json.loads((result.output / "config.json").read_text())["dtype"] == "bfloat16"
    assert_loads_cleanly(result.output)
    out = load_tensors(result.output)
    base, ft1, ft2 = (load_tensors(sharded_family[k]) for k in ("base", "ft1", "ft2"))
    for name, value in out.items():
        expected = base[name] + 0.8 * ((ft1[name] - base[name]) - 0.5 * (ft2[name] - base[name]))
        rounded = torch.from_numpy(expected).to(torch.bfloat16).to(torch.float64).numpy()
        ulp = np.abs(expected) * 2.0**-7  # one bfloat16 step
        assert np.all(np.abs(value - rounded) <= ulp + 1e-12), name


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_merging_identical_models_is_bit_for_bit(
    family: dict[str, Path], tmp_path: Path, method: str
) -> None:
    import shutil

    copies = [shutil.copytree(family["ft1"], tmp_path / f"copy{i}") for i in range(3)]
    config: dict[str, object] = {
        "merge_method": method,
        "models": [
            {"model": str(c), "parameters": {"weight": w}}
            for c, w in zip(copies, (0.1, 0.2, 0.7), strict=True)
        ],
    }
    if method == "task_arithmetic":
        config["base_model"] = str(family["ft1"])
        config["parameters"] = {"normalize": True, "lambda": 0.8}
    out = merge(config, tmp_path / "out").output
    original, merged = load_tensors(family["ft1"]), load_tensors(out)
    assert set(original) == set(merged)
    assert all(np.array_equal(original[n], merged[n]) for n in original)


def test_tied_embeddings_stay_tied(tied_family: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tied_family["base"]),
        "models": [
            {"model": str(tied_family[k]), "parameters": {"weight": 0.5}} for k in ("ft1", "ft2")
        ],
    }
    out = merge(config, tmp_path / "out").output
    assert "lm_head.weight" not in load_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_loads_cleanly(out)


def test_recipe_is_written_and_accepted_back(family: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": [1.0, 0.25]}}],
        "parameters": {"normalize": True},
    }
    first = merge(config, tmp_path / "a")
    recipe = first.output / "alloykit_config.yml"
    second = merge(recipe, tmp_path / "b")
    assert recipe_hash(load_config(recipe)) == first.recipe_hash == second.recipe_hash
    assert (first.output / "model.safetensors").read_bytes() == (
        second.output / "model.safetensors"
    ).read_bytes()


def test_in_memory_merge_equals_the_written_one(family: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft3")
        ],
    }
    state = merge_to_state_dict(config)
    written = load_tensors(merge(config, tmp_path / "out").output)
    assert set(state) == set(written)
    for name, tensor in state.items():
        assert np.array_equal(tensor.double().numpy(), written[name])


def test_slices_form_equals_models_form(family: dict[str, Path], tmp_path: Path) -> None:
    base, ft1, ft2 = (str(family[k]) for k in ("base", "ft1", "ft2"))
    models_form = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": ft1, "parameters": {"weight": 0.6}},
            {"model": ft2, "parameters": {"weight": [0.2, 0.9]}},
        ],
    }
    slices_form = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, NUM_LAYERS]},
                    {"model": ft1, "layer_range": [0, NUM_LAYERS]},
                    {
                        "model": ft2,
                        "layer_range": [0, NUM_LAYERS],
                        "parameters": {"weight": [0.2, 0.9]},
                    },
                ],
                "parameters": {"weight": 0.6},  # slice level: reaches ft1, not ft2 (its own wins)
            }
        ],
    }
    a = load_tensors(merge(models_form, tmp_path / "a").output)
    b = load_tensors(merge(slices_form, tmp_path / "b").output)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_out_dtype_and_dtype(family: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = merge(config, tmp_path / "out").output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_dtype_the_inputs_widen_to_reads_them_mapped(
    sharded_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """bfloat16 inputs with ``dtype: bfloat16`` or ``float32`` (rounding them changes nothing)
    are converted straight from the mapped file, never copied through a read buffer, and merge
    to the same bits as rounding them first."""
    from alloykit import execute
    from alloykit.io.checkpoint import Checkpoint

    config = {
        "merge_method": "ties",
        "base_model": str(sharded_family["base"]),
        "models": [
            {"model": str(sharded_family[k]), "parameters": {"weight": 1.0, "density": 0.5}}
            for k in ("ft1", "ft2")
        ],
        "dtype": dtype,
    }
    monkeypatch.setattr(execute, "rounds_exactly", lambda stored, load: False)
    rounded = merge_to_state_dict(config)
    monkeypatch.undo()
    buffered: list[str] = []
    real = Checkpoint._read_bytes

    def counted(self: Checkpoint, file: Path, offset: int, count: int, name: str) -> torch.Tensor:
        buffered.append(name)
        return real(self, file, offset, count, name)

    monkeypatch.setattr(Checkpoint, "_read_bytes", counted)
    mapped = merge_to_state_dict(config)
    merged = [n for n in mapped if "layers" in n and n.endswith("proj.weight")]
    assert merged and not set(merged) & set(buffered)
    assert all(torch.equal(mapped[n], rounded[n]) for n in rounded)


@pytest.mark.parametrize(
    ("stored", "load", "exact"),
    [
        (torch.bfloat16, None, True),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.bfloat16, torch.float32, True),
        (torch.float16, torch.float32, True),
        (torch.float32, torch.float64, True),
        (torch.float32, torch.bfloat16, False),
        (torch.float16, torch.bfloat16, False),
        (torch.bfloat16, torch.float16, False),
        (torch.int64, torch.float32, False),
    ],
)
def test_rounds_exactly(stored: torch.dtype, load: torch.dtype | None, exact: bool) -> None:
    from alloykit.execute import rounds_exactly

    assert rounds_exactly(stored, load) is exact
    if exact and load is not None:  # every bit pattern of the stored dtype survives the trip
        bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
        values = bits.view(stored) if stored.itemsize == 2 else torch.randn(1000).to(stored)
        back = values.to(load).to(stored)
        assert torch.equal(back.isnan(), values.isnan())
        keep = ~values.isnan()
        assert torch.equal(back[keep].view(torch.uint8), values[keep].view(torch.uint8))


def test_dry_run_plan_reads_no_tensor(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alloykit.io.checkpoint import Checkpoint

    def forbidden(*args: object) -> None:
        raise AssertionError("planning read a tensor")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": [0.0, 1.0]}}],
    }
    plan = plan_merge(config)
    assert len(plan.jobs) == len(load_tensors(family["base"]))
    last_layer = next(
        j for j in plan.jobs if j.output.startswith(f"model.layers.{NUM_LAYERS - 1}.")
    )
    first_layer = next(j for j in plan.jobs if j.output.startswith("model.layers.0."))
    head = next(j for j in plan.jobs if j.output == "lm_head.weight")
    assert last_layer.per_model["weight"] == (1.0,)
    assert first_layer.per_model["weight"] == (0.0,)
    assert head.per_model["weight"] == (0.0,)  # embeddings and head use t = 0


def test_float64_precision_and_threads_give_consistent_results(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(family[k]), "parameters": {"weight": w}}
            for k, w in (("ft1", 0.3), ("ft2", 0.7))
        ],
    }
    one = merge_to_state_dict(config, MergeOptions(threads=1))
    two = merge_to_state_dict(config, MergeOptions(threads=2))
    wide = merge_to_state_dict(config, MergeOptions(precision="float64"))
    for name in one:
        assert torch.equal(one[name], two[name])
        torch.testing.assert_close(one[name], wide[name], rtol=0, atol=1e-6)


def test_each_slice_has_its_own_ramp_and_one_layer_slices_get_t_1(
    family: dict[str, Path], tmp_path: Path
) -> None:
    ft1, ft2 = str(family["ft1"]), str(family["ft2"])

    def sources(start: int, end: int) -> list[dict[str, object]]:
        return [
            {"model": ft1, "layer_range": [start, end], "parameters": {"weight": 1.0}},
            {"model": ft2, "layer_range": [start, end], "parameters": {"weight": [0.0, 1.0]}},
        ]

    config = {
        "merge_method": "linear",
        "slices": [
            {"sources": sources(0, 2)},
            {"sources": sources(2, 4)},
            {"sources": sources(1, 2)},
        ],
    }
    plan = plan_merge(config)
    weight_of_ft2 = {
        job.output.split(".")[2]: job.per_model["weight"][1]
        for job in plan.jobs
        if job.output.endswith("mlp.up_proj.weight")
    }
    # slice 1 -> output layers 0, 1; slice 2 -> 2, 3; the one-layer slice 3 -> layer 4 with t = 1
    assert weight_of_ft2 == {"0": 0.0, "1": 1.0, "2": 0.0, "3": 1.0, "4": 1.0}
    layer_4 = next(j for j in plan.jobs if j.output == "model.layers.4.mlp.up_proj.weight")
    assert [i.tensor for i in layer_4.inputs] == ["model.layers.1.mlp.up_proj.weight"] * 2
    assert plan.config is not None and plan.config["num_hidden_layers"] == 5
    out = merge(config, tmp_path / "out").output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    assert_loads_cleanly(out)
    merged, a, b = load_tensors(out), load_tensors(family["ft1"]), load_tensors(family["ft2"])
    name = "model.layers.{}.self_attn.q_proj.weight"
    np.testing.assert_allclose(
        merged[name.format(4)], (a[name.format(1)] + b[name.format(1)]) / 2, atol=1e-7
    )
    np.testing.assert_array_equal(
        merged[name.format(2)], a[name.format(2)]
    )  # ft2 weight 0 at t = 0


def test_tensors_only_a_fine_tune_has_are_named_in_a_warning(
    family: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    extra = Path(shutil.copytree(family["ft1"], tmp_path / "extra"))
    tensors = load_file(extra / "model.safetensors")
    tensors["model.adapter.weight"] = torch.zeros(2)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(extra), "parameters": {"weight": 1.0}}],
    }
    with caplog.at_level(logging.WARNING, logger="alloykit"):
        plan_merge(config)
    assert (
        f"model '{extra}': 1 tensors are not in the output (e.g. 'model.adapter.weight')"
        in caplog.text
    )


def test_device_choice(family: dict[str, Path]) -> None:
    from alloykit.errors import AlloyError

    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(family[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")
        ],
    }
    on_cpu = merge_to_state_dict(config, MergeOptions(device="cpu"))
    automatic = merge_to_state_dict(config, MergeOptions(device="auto"))
    for name in on_cpu:  # auto is cuda where there is one: equal up to rounding
        torch.testing.assert_close(on_cpu[name], automatic[name], rtol=1e-6, atol=1e-7)
    if not torch.cuda.is_available():
        with pytest.raises(AlloyError, match="--device cuda: no CUDA device is available"):
            merge_to_state_dict(config, MergeOptions(device="cuda"))
    with pytest.raises(AlloyError, match="--device 'gpu0' is not a device"):
        merge_to_state_dict(config, MergeOptions(device="gpu0"))


def test_passthrough_frankenmerge_loads_with_the_new_depth(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(family["ft1"]), "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": str(family["ft2"]),
                        "layer_range": [1, 4],
                        "parameters": {
                            "scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]
                        },
                    }
                ]
            },
        ],
    }
    out = merge(config, tmp_path / "out").output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert_loads_cleanly(out)
    merged, a, b = load_tensors(out), load_tensors(family["ft1"]), load_tensors(family["ft2"])
    assert np.array_equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert np.array_equal(merged["lm_head.weight"], b["lm_head.weight"])  # head: last slice
    assert np.array_equal(
        merged["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"]
    )
    assert np.array_equal(
        merged["model.layers.3.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"]
    )
    assert not merged["model.layers.5.self_attn.o_proj.weight"].any()  # scaled by 0


def test_passthrough_needs_one_model_per_slice(family: dict[str, Path]) -> None:
    from alloykit.errors import ConfigError

    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(family[k]), "layer_range": [0, 2]} for k in ("ft1", "ft2")]}
        ],
    }
    with pytest.raises(ConfigError, match="passthrough takes exactly one model per slice, got 2"):
        plan_merge(config)


def test_object_model_reference_with_override_architecture(
    family: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": {
            "model": {"path": str(family["base"])},
            "override_architecture": "MistralForCausalLM",
        },
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    out = merge(config, tmp_path / "out", MergeOptions(allow_crimes=True)).output
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    with pytest.raises(Exception, match="different architectures"):
        plan_merge({**config})


def test_keep_from_base_takes_those_module_kinds_unchanged(family: dict[str, Path]) -> None:
    config = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family[k]), "parameters": {"weight": 1.0, "density": 0.5}}
            for k in ("ft1", "ft2")
        ],
        "keep_from_base": ["embedding", "head", "norm"],
    }
    state = merge_to_state_dict(config)
    base = load_tensors(family["base"])
    kept = [n for n in base if "embed" in n or "lm_head" in n or "norm" in n]
    assert len(kept) == 2 + 1 + 2 * NUM_LAYERS
    for name in kept:
        assert np.array_equal(state[name].double().numpy(), base[name]), name
    assert not np.array_equal(
        state["model.layers.0.mlp.up_proj.weight"].double().numpy(),
        base["model.layers.0.mlp.up_proj.weight"],
    )


def test_keep_from_base_is_validated() -> None:
    from alloykit.errors import ConfigError

    config = {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 1}}],
        "keep_from_base": ["embeddings"],
    }
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "keep_from_base[0]: unknown module kind 'embeddings' (did you mean 'embedding'?)" in str(
        info.value
    )
    assert "keep_from_base: needs a base_model" in str(info.value)
