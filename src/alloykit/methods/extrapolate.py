"""Model extrapolation (ExPO): move past a fine-tune, away from the model it started from."""

from __future__ import annotations

import torch

from alloykit.methods.registry import MethodInputs


def extrapolate(base: torch.Tensor, tuned: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """ExPO: ``θ = θ_ft + α·(θ_ft − θ_base)``, amplifying the change the fine-tune made.

    Zheng et al. 2024, "Weak-to-Strong Extrapolation Expedites Alignment" (published as "Model
    Extrapolation Expedites Alignment", ACL 2025), arXiv:2404.16792. ``base`` is the weaker
    starting point (the SFT checkpoint), ``tuned`` the aligned model (DPO/RLHF). ``alpha = 0``
    returns ``tuned``; ``alpha = −1`` returns ``base``.

    Args:
        base: the starting model's tensor (θ_base, e.g. the SFT checkpoint).
        tuned: the fine-tuned model's tensor (θ_ft), same shape.
        alpha: extrapolation strength α (default 0.1, FusionBench's; the authors' released
            models use 0.3).

    Returns:
        A new tensor of ``tuned``'s shape and dtype.

    Example:
        >>> extrapolate(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), alpha=0.5)
        tensor([2.5000, 2.0000])
    """
    # θ_ft + α(θ_ft − θ_base) = (1 + α)·θ_ft − α·θ_base; the first form keeps θ_ft exact
    # wherever the fine-tune did not move the weight (a zero difference).
    difference = tuned - base
    return difference.mul_(alpha).add_(tuned)


def run_expo(inputs: MethodInputs) -> torch.Tensor:
    """Registry adapter: :func:`extrapolate` from the base through the one other model."""
    assert inputs.base is not None  # the planner guarantees a base for "required"
    if inputs.tensors.shape[0] != 1:  # the planner enforces max_models; kernels are callable too
        raise ValueError(
            f"expo takes exactly one model besides the base, got {inputs.tensors.shape[0]}"
        )
    return extrapolate(inputs.base, inputs.tensors[0], float(inputs.params["alpha"]))
