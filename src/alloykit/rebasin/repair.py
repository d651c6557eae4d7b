"""Repairing a merged network's activation statistics: BatchNorm reset and REPAIR.

Averaging two aligned networks shrinks the variance of hidden activations (the averaged units
are not perfectly correlated), which alone can ruin the midpoint; Jordan et al. 2023 ("REPAIR:
REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023, arXiv:2211.08403)
call this variance collapse. Two fixes, both needing a little calibration data:

* **BatchNorm reset**: a network with BatchNorm has normalisers whose running statistics were
  averaged too; recomputing them on calibration data restores what each BN layer sees
  (the fix the Git Re-Basin ports found necessary for ResNets with BN).
* **REPAIR** (Jordan et al. 2023, section 4): for a network without BatchNorm, rescale each
  hidden unit of the merged network so that its pre-activation mean and standard deviation on
  the calibration data equal the interpolation of the endpoints':
  mu = sum_i w_i mu_i, sigma = sum_i w_i sigma_i. The correction is an affine map of each
  unit's output, folded into the layer's weight rows and bias.

These work on ``torch.nn.Module`` objects: the model is built by a user function
(``--module FILE.py:FUNCTION``) and loaded with the merged state dict.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from alloykit.errors import AlloyError

_NORMS = (nn.modules.batchnorm._BatchNorm,)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPS = 1e-8  # guards a dead unit (zero std) against division by zero


def batches(inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``inputs`` split along dim 0 into batches of at most ``batch_size`` examples."""
    return list(torch.split(inputs, batch_size))


@torch.no_grad()
def reset_batchnorm(module: nn.Module, data: Iterable[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running mean and variance on ``data``; return how many.

    The statistics are the plain average of the batches' statistics (``momentum=None``), not
    an exponential average, so the result does not depend on batch order. The module's training
    flags and momenta are restored afterwards.
    """
    norms = [m for m in module.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    was_training = module.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: the plain mean over batches
    module.train()
    for batch in data:
        module(batch)
    for norm, momentum in saved:
        norm.momentum = momentum
    module.train(was_training)
    return len(norms)


def _unit_axis(layer: nn.Module, output: torch.Tensor) -> int:
    """The axis of a layer's output that indexes its units (channels)."""
    return output.ndim - 1 if isinstance(layer, nn.Linear) else 1


@torch.no_grad()
def _unit_statistics(
    module: nn.Module, layers: Sequence[nn.Module], data: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and standard deviation of each layer's output over ``data`` (float64)."""
    sums: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(index: int) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def record(layer: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            units = output.movedim(_unit_axis(layer, output), -1).reshape(
                -1, output.shape[_unit_axis(layer, output)]
            )
            units = units.to(torch.float64)
            stats = torch.stack(
                [units.sum(0), (units * units).sum(0), torch.full_like(units[0], units.shape[0])]
            )
            sums[index].append(stats)

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = module.training
    module.eval()
    try:
        for batch in data:
            module(batch)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    statistics = []
    for recorded in sums:
        total, squares, count = torch.stack(recorded).sum(0)
        mean = total / count
        variance = (squares / count - mean * mean).clamp_min(0)
        statistics.append((mean, variance.sqrt()))
    return statistics


def hidden_layers(module: nn.Module) -> list[str]:
    """Names of the Linear/Conv layers whose outputs are hidden units: all but the last."""
    names = [name for name, m in module.named_modules() if isinstance(m, _LAYERS)]
    return names[:-1]


@torch.no_grad()
def repair(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    weights: Sequence[float],
    data: Sequence[torch.Tensor],
    layer_names: Sequence[str] | None = None,
) -> int:
    """REPAIR ``merged`` in place: each hidden unit gets the endpoints' interpolated statistics.

    Jordan et al. 2023 (arXiv:2211.08403), section 4: for every unit of every hidden layer, the
    target is mu = sum_i w_i mu_i and sigma = sum_i w_i sigma_i over the endpoints' outputs on
    ``data``; the merged layer's rows are rescaled by sigma / sigma_merged and its bias shifted
    so its output mean is mu. Layers are corrected in order, each measured after the ones
    before it were corrected.

    Args:
        merged: the interpolated network (loaded with the merged weights).
        endpoints: the aligned networks it interpolates.
        weights: their interpolation weights (summing to one).
        data: calibration batches.
        layer_names: the layers to correct (default: :func:`hidden_layers`).

    Returns:
        The number of layers corrected.
    """
    names = list(layer_names) if layer_names is not None else hidden_layers(merged)
    if not names:
        return 0
    targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for endpoint, weight in zip(endpoints, weights, strict=True):
        layers = [endpoint.get_submodule(n) for n in names]
        stats = _unit_statistics(endpoint, layers, data)
        scaled = [(weight * mean, weight * std) for mean, std in stats]
        targets = (
            scaled
            if targets is None
            else [(a + m, b + s) for (a, b), (m, s) in zip(targets, scaled, strict=True)]
        )
    for name, (target_mean, target_std) in zip(names, targets or [], strict=True):
        layer = merged.get_submodule(name)
        ((mean, std),) = _unit_statistics(merged, [layer], data)
        scale = target_std / (std + _EPS)
        rows: torch.Tensor = layer.weight  # type: ignore[assignment]
        shape = (-1,) + (1,) * (rows.ndim - 1)
        rows.copy_((rows.to(torch.float64) * scale.reshape(shape)).to(rows.dtype))
        bias = layer.bias
        if isinstance(bias, torch.Tensor):  # without a bias only the spread is matched
            bias.copy_(((bias.to(torch.float64) - mean) * scale + target_mean).to(bias.dtype))
    return len(names)


def load_builder(reference: str) -> Callable[[], nn.Module]:
    """The model-building function named by ``FILE.py:FUNCTION``.

    Raises AlloyError naming the file or function when it cannot be found.
    """
    file_name, _, function = reference.rpartition(":")
    path = Path(file_name)
    if not file_name or not function or path.suffix != ".py":
        raise AlloyError(
            f"--module '{reference}': give FILE.py:FUNCTION, a function that returns the "
            "torch.nn.Module whose state dict the models hold"
        )
    if not path.is_file():
        raise AlloyError(f"--module '{reference}': file '{path}' not found")
    loaded = importlib.util.spec_from_file_location(f"_alloykit_user_{path.stem}", path)
    if loaded is None or loaded.loader is None:
        raise AlloyError(f"--module '{reference}': cannot import '{path}'")
    code = importlib.util.module_from_spec(loaded)
    try:
        loaded.loader.exec_module(code)
    except Exception as e:
        raise AlloyError(f"--module '{reference}': importing '{path}' failed ({e})") from e
    builder = getattr(code, function, None)
    if not callable(builder):
        raise AlloyError(f"--module '{reference}': '{path}' has no function '{function}'")
    return builder


def load_inputs(path: Path) -> torch.Tensor:
    """Calibration inputs: the one tensor (or the ``inputs`` tensor) of a .pt/.safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content: object = load_file(path)
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AlloyError(f"calibration file '{path}': cannot read it ({e})") from e
    if isinstance(content, dict):
        tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
        if "inputs" in tensors:
            content = tensors["inputs"]
        elif len(tensors) == 1:
            content = next(iter(tensors.values()))
    if not isinstance(content, torch.Tensor) or content.ndim < 1 or len(content) == 0:
        raise AlloyError(
            f"calibration file '{path}': expected one tensor of inputs (examples on dim 0), "
            "or a dict with an 'inputs' tensor"
        )
    return content
