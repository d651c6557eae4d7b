"""Data-aware merges: RegMean, Fisher merging, and activation-informed merging (AIM).

These kernels are pure functions like every other method; what sets them apart is that each
needs a statistic measured on calibration data, which :mod:`alloykit.calibration` computes once
per model and the executor hands in through :class:`~alloykit.methods.registry.MethodInputs`:

- RegMean (Jin et al. 2023, arXiv:2212.09849): per linear layer, the Gram matrix
  ``G_i = X_iᵀX_i`` of the layer's inputs on model i's calibration activations;
- Fisher merging (Matena & Raffel 2022, arXiv:2111.09832): each parameter's diagonal Fisher
  information ``F_i = E_x E_(y~p_i)[(∂ log p_i(y|x)/∂θ)²]``;
- AIM (Nobari et al. 2025, arXiv:2502.02421): the base model's mean absolute activation per
  input channel of each linear layer, which protects the base's salient weights after any merge.
"""

from __future__ import annotations

import torch

from alloykit.methods.registry import MethodInputs


def _weighted_mean(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w_i·x_i / Σ w_i over dim 0."""
    shaped = weights.to(tensors).reshape(-1, *([1] * (tensors.dim() - 1)))
    return (tensors * shaped).sum(0) / shaped.sum()


def regmean(
    tensors: torch.Tensor, grams: torch.Tensor, alpha: float, input_axis: int = -1
) -> torch.Tensor:
    """RegMean's closed-form merge of one linear layer's weights.

    W = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i with G̃_i = α·G_i + (1 − α)·diag(G_i), where ``W_i`` is the
    layer's weight with its input axis first (y = xW) and ``G_i = X_iᵀX_i``. With α = 1 it is
    the least-squares W minimising Σ_i ‖X_i W − X_i W_i‖²; smaller α shrinks the off-diagonal
    terms toward a per-channel weighted average (Jin et al. 2023, Dataless Knowledge Fusion by
    Merging Weights of Language Models, ICLR, arXiv:2212.09849, §3.2).

    Args:
        tensors: ``(k, *shape)``: one weight per model.
        grams: ``(k, d, d)``: each model's Gram matrix of the layer's ``d`` input channels.
        alpha: the share of the off-diagonal Gram terms kept, in [0, 1].
        input_axis: the axis of a weight that holds the input channels (1 for
            ``nn.Linear.weight``, 0 for GPT-2's ``Conv1D.weight``); negative counts from the end.

    Returns:
        The merged weight, ``shape``, in the inputs' dtype.

    Example:
        >>> w = torch.randn(2, 3, 4); g = torch.eye(4).expand(2, 4, 4)
        >>> torch.allclose(regmean(w, g, 1.0, 1), w.mean(0), atol=1e-6)
        True
    """
    axis = input_axis % (tensors.dim() - 1) + 1  # in the (k, *shape) stack
    k, d = tensors.shape[0], tensors.shape[axis]
    # (k, d, rest): each model's weight as the paper's W_i, input channels first
    weights = tensors.movedim(axis, 1).reshape(k, d, -1).to(torch.float64)
    grams = grams.to(torch.float64)
    diagonal = torch.diagonal(grams, dim1=1, dim2=2)
    # 1. shrink the off-diagonal terms: G̃_i = α·G_i + (1 − α)·diag(G_i)
    shrunk = alpha * grams + (1.0 - alpha) * torch.diag_embed(diagonal)
    # 2. W = (Σ G̃_i)⁻¹ · Σ G̃_i W_i
    total = shrunk.sum(0)  # (d, d)
    target = torch.bmm(shrunk, weights).sum(0)  # (d, rest)
    merged, info = torch.linalg.solve_ex(total, target)
    if int(info) != 0:  # an input channel no model ever uses: the least-norm solution
        merged = torch.linalg.pinv(total, hermitian=True) @ target
    moved_shape = tensors.movedim(axis, 1).shape[1:]
    return merged.reshape(moved_shape).movedim(0, axis - 1).to(tensors.dtype)


def run_regmean(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: RegMean where the models have Gram matrices, the mean elsewhere.

    Tensors that are not linear-layer weights (embeddings, norms, biases) have no Gram matrix
    and are averaged, as in the paper.
    """
    if inputs.statistics is None:
        return inputs.tensors.mean(0)
    return regmean(
        inputs.tensors, inputs.statistics, float(inputs.params["alpha"]), inputs.input_axis
    )


def fisher_merge(
    tensors: torch.Tensor, fishers: torch.Tensor, weights: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Fisher merging: a per-parameter average weighted by each model's Fisher information.

    θ = Σ_i c_i·(F_i + ε)·θ_i / Σ_i c_i·(F_i + ε), elementwise (Matena & Raffel 2022, Merging
    Models with Fisher-Weighted Averaging, NeurIPS, arXiv:2111.09832, eq. 3). ε keeps
    parameters that no model's data reached (F_i = 0 for all i) at the plain weighted mean.

    Args:
        tensors: ``(k, *shape)``: one tensor per model.
        fishers: ``(k, *shape)``: each model's diagonal Fisher for this tensor.
        weights: ``(k,)``: the models' coefficients c_i.
        epsilon: added to every Fisher value (> 0).

    Example:
        >>> x = torch.randn(2, 5); f = torch.rand(5).expand(2, 5)
        >>> torch.allclose(fisher_merge(x, f, torch.ones(2), 1e-6), x.mean(0))
        True
    """
    shaped = weights.to(tensors).reshape(-1, *([1] * (tensors.dim() - 1)))
    mass = shaped * (fishers.to(tensors) + epsilon)
    return (mass * tensors).sum(0) / mass.sum(0)


def run_fisher(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: Fisher-weighted average; the weighted mean where no Fisher exists.

    With ``normalize``, each model's Fisher is divided by its L2 norm over the whole model,
    ``statistics_norm`` (per model, supplied by the executor): Matena & Raffel's c_i ∝ 1/‖F_i‖.
    """
    weights = inputs.per_model["weight"]
    fishers = inputs.statistics
    if fishers is None:
        return _weighted_mean(inputs.tensors, weights)
    if inputs.params.get("normalize") and "statistics_norm" in inputs.per_model:
        norms = inputs.per_model["statistics_norm"].to(fishers)
        fishers = fishers / norms.clamp_min(1e-30).reshape(-1, *([1] * (fishers.dim() - 1)))
    return fisher_merge(inputs.tensors, fishers, weights, float(inputs.params["epsilon"]))


def aim(
    merged: torch.Tensor,
    base: torch.Tensor,
    activation: torch.Tensor,
    strength: float,
    input_axis: int = -1,
) -> torch.Tensor:
    """Activation-informed merging: pull a merged linear weight back toward the base on the
    input channels the base model uses most.

    â = a / max(a) with ``a_j`` the base's mean |x_j| on calibration data; r_j = 1 − s·â_j;
    out = base + (merged − base)·r, r broadcast over the input axis. ``s = 1 − ω`` in Nobari et
    al. 2025 (Activation-Informed Merging of Large Language Models, arXiv:2502.02421), so s = 0
    returns ``merged`` and the paper's ω = 0.4 is s = 0.6.

    Args:
        merged: the merged tensor, any method's output.
        base: the base model's tensor, same shape.
        activation: ``(d,)`` the base's mean absolute input activation per channel.
        strength: s in [0, 1].
        input_axis: the axis of the weight that holds the ``d`` input channels.

    Example:
        >>> m, b = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
        >>> aim(m, b, torch.tensor([1.0, 0.5, 0.0]), 0.6, input_axis=1)[0].tolist()
        [0.4, 0.7, 1.0]
    """
    peak = activation.abs().max()
    if strength == 0 or float(peak) == 0.0:
        return merged
    relax = 1.0 - strength * (activation / peak).to(merged)
    shape = [1] * merged.dim()
    shape[input_axis] = -1
    return base + (merged - base) * relax.reshape(shape)
