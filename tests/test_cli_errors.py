"""Bad input: one error line naming the model, tensor or key; non-zero exit; no output folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.toymodels import ToySpec, make_family
from tests.helpers import run_cli


def recipe(
    tmp_path: Path,
    models: list[Path],
    base: Path | None = None,
    method: str = "linear",
    extra: str = "",
) -> Path:
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for model in models:
        lines += [f"  - model: {model}", "    parameters: {weight: 0.5}"]
    path = tmp_path / "recipe.yml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def assert_clean_failure(tmp_path: Path, *args: str | Path, expect: str) -> str:
    out = tmp_path / "merged"
    result = run_cli("merge", *args, out)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert expect in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "alloykit-partial" in p.name]
    return lines[0]


def copy_model(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


def rewrite(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    file = folder / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_folder(tmp_path: Path, family: dict[str, Path]) -> None:
    missing = tmp_path / "no" / "such-model"
    config = recipe(tmp_path, [family["ft1"], missing])
    assert_clean_failure(tmp_path, config, expect=f"model '{missing}': no such folder")


def test_missing_repo_id_offline(
    tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    config = recipe(tmp_path, [family["ft1"], Path("alloykit-test/not-a-model")])
    assert_clean_failure(
        tmp_path,
        config,
        expect="model 'alloykit-test/not-a-model': no such folder, and the Hugging Face Hub cannot provide it",
    )


def test_tensor_missing_from_one_model(tmp_path: Path, family: dict[str, Path]) -> None:
    broken = copy_model(family["ft2"], tmp_path / "broken")
    rewrite(broken, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    config = recipe(tmp_path, [family["ft1"], broken])
    assert_clean_failure(
        tmp_path,
        config,
        expect=f"tensor 'model.layers.2.mlp.up_proj.weight' is missing from model '{broken}'",
    )


@pytest.fixture(scope="module")
def wider(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wider")
    return make_family(root, ToySpec(intermediate_size=48), finetunes=0)["base"]


def test_shape_mismatch(tmp_path: Path, family: dict[str, Path], wider: Path) -> None:
    config = recipe(tmp_path, [family["ft1"], wider])
    line = assert_clean_failure(
        tmp_path, config, expect="tensor 'model.layers.0.mlp.down_proj.weight' has shape [32, 48]"
    )
    assert str(wider) in line


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mistral")
    return make_family(root, ToySpec(model_type="mistral"), finetunes=0)["base"]


def test_different_architectures_need_allow_crimes(
    tmp_path: Path, family: dict[str, Path], mistral: Path
) -> None:
    config = recipe(tmp_path, [family["ft1"], mistral])
    assert_clean_failure(
        tmp_path, config, expect="different model_type (llama vs mistral); pass --allow-crimes"
    )
    result = run_cli("merge", config, tmp_path / "crimes", "--allow-crimes", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "crimes" / "model.safetensors").is_file()


def test_truncated_safetensors(tmp_path: Path, family: dict[str, Path]) -> None:
    broken = copy_model(family["ft2"], tmp_path / "truncated")
    file = broken / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    config = recipe(tmp_path, [family["ft1"], broken])
    assert_clean_failure(tmp_path, config, expect=f"'{file}': truncated safetensors file")


def test_corrupted_safetensors(tmp_path: Path, family: dict[str, Path]) -> None:
    broken = copy_model(family["ft2"], tmp_path / "corrupted")
    file = broken / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    file.write_bytes(bytes(data))
    config = recipe(tmp_path, [family["ft1"], broken])
    assert_clean_failure(tmp_path, config, expect=f"'{file}': cannot read the safetensors header")


def test_unknown_method(tmp_path: Path, family: dict[str, Path]) -> None:
    config = recipe(
        tmp_path, [family["ft1"], family["ft2"]], method="task_arithmetc", base=family["base"]
    )
    assert_clean_failure(
        tmp_path, config, expect="unknown method 'task_arithmetc' (did you mean 'task_arithmetic'?)"
    )


def test_unknown_parameter_under_strict(tmp_path: Path, family: dict[str, Path]) -> None:
    config = recipe(tmp_path, [family["ft1"], family["ft2"]], extra="parameters:\n  densty: 0.5\n")
    assert_clean_failure(
        tmp_path,
        config,
        "--strict",
        expect="parameters.densty: 'densty' is not a parameter of linear",
    )
    result = run_cli("merge", config, tmp_path / "lenient")
    assert result.returncode == 0
    assert "warning: parameters.densty" in result.stderr


def test_non_finite_result_leaves_nothing_behind(tmp_path: Path, family: dict[str, Path]) -> None:
    broken = copy_model(family["ft2"], tmp_path / "nan")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.3.self_attn.o_proj.weight"][0, 0] = float("nan")

    rewrite(broken, poison)
    config = recipe(tmp_path, [family["ft1"], broken])
    assert_clean_failure(
        tmp_path,
        config,
        expect="tensor 'model.layers.3.self_attn.o_proj.weight': linear produced 1 non-finite values",
    )


def test_weights_that_sum_to_zero(tmp_path: Path, family: dict[str, Path]) -> None:
    config = tmp_path / "zero.yml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {family['ft1']}\n    parameters: {{weight: 1}}\n  - model: {family['ft2']}\n    parameters: {{weight: -1}}\n"
    )
    assert_clean_failure(
        tmp_path, config, expect="the weights sum to 0, and normalize: true would divide by it"
    )


def test_missing_required_weight(tmp_path: Path, family: dict[str, Path]) -> None:
    config = tmp_path / "noweight.yml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {family['ft1']}\n    parameters: {{weight: 1}}\n  - model: {family['ft2']}\n"
    )
    assert_clean_failure(
        tmp_path, config, expect=f"models[1]: linear needs 'weight' for model '{family['ft2']}'"
    )


def test_old_pickle_checkpoint(tmp_path: Path, family: dict[str, Path]) -> None:
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(family["ft2"] / "config.json", old / "config.json")
    torch.save(
        load_file(family["ft2"] / "model.safetensors"),
        old / "pytorch_model.bin",
        _use_new_zipfile_serialization=False,
    )
    config = recipe(tmp_path, [family["ft1"], old])
    assert_clean_failure(
        tmp_path,
        config,
        expect="an old (pre-zip) PyTorch pickle, which cannot be read safely; re-save the model as safetensors",
    )


def test_existing_output_needs_overwrite(tmp_path: Path, family: dict[str, Path]) -> None:
    config = recipe(tmp_path, [family["ft1"], family["ft2"]])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("merge", config, out)
    assert result.returncode != 0
    assert "exists and is not empty; pass --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = run_cli("merge", config, out, "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_quantized_input(tmp_path: Path, family: dict[str, Path]) -> None:
    import json

    quantized = copy_model(family["ft2"], tmp_path / "gptq")
    config_path = quantized / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    config_path.write_text(json.dumps(config))
    recipe_path = recipe(tmp_path, [family["ft1"], quantized])
    assert_clean_failure(
        tmp_path,
        recipe_path,
        expect=f"model '{quantized}' is quantized (quant_method: gptq); quantized inputs are not supported: dequantize it first",
    )
