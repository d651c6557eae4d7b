"""Router (gate) weights for an MoE built from dense experts, before any training.

A layer's router scores expert ``e`` for a token as ``w_e . x`` with ``x`` the token's hidden
state; top-k of the softmax picks the experts (Mixtral: Jiang et al. 2024, arXiv:2401.04088).
With no training, ``w_e`` is set from prompts that describe what expert ``e`` is for
(MergeKit's mergekit-moe heuristics: Goddard et al. 2024, arXiv:2403.13257):

- ``hidden``: run each prompt (after a BOS token) through the base model; its vector at layer
  ``l`` is the hidden state entering layer ``l`` at the last token (``hidden_avg``: averaged
  over the tokens). ``w_e`` at layer ``l`` = normalise(mean over e's positive prompts - mean
  over its negative prompts).
- ``cheap_embed``: a prompt's vector is the sum of its tokens' input embeddings, the same at
  every layer; no forward pass.
- ``random``: standard normal entries; ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)), the
  initialisation of ``nn.Linear``.

All draws come from one ``torch.Generator`` seeded by the caller, so a seed fixes the gates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alloykit.architecture import input_embedding_name
from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import Checkpoint
from alloykit.moe.config import Expert, GateMode

DEGENERATE_CONDITION = 5.0  # above this a layer's gate rows are close to linearly dependent

PromptVector = Callable[[str], torch.Tensor]  # prompt -> (layers, hidden)


def gate_weights(
    mode: GateMode,
    experts: Sequence[Expert],
    base: Checkpoint,
    *,
    layers: int,
    hidden: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Gate rows for every layer and expert: a float32 ``(layers, len(experts), hidden)`` tensor.

    Args:
        mode: the gate initialisation (module docstring).
        experts: the experts in output order (a shared expert last, for its own gate row).
        base: the base model, whose embeddings or forward pass turn prompts into vectors.
        layers: number of decoder layers; hidden: the hidden size.
        seed: seed of the random modes.
        device: where the base model's forward pass runs (``hidden`` modes).

    Example:
        >>> g = gate_weights("random", [e1, e2], base, layers=4, hidden=32, seed=0,
        ...                  device=torch.device("cpu"))  # doctest: +SKIP
        >>> g.shape  # doctest: +SKIP
        torch.Size([4, 2, 32])
    """
    shape = (layers, len(experts), hidden)
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    if mode == "uniform_random":
        bound = 1.0 / math.sqrt(hidden)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    if mode == "cheap_embed":
        rows = [_expert_vector(e, _embedding_vectors(base, layers)) for e in experts]
    else:
        with _HiddenStates(base, device, average=mode == "hidden_avg") as vectors:
            rows = [_expert_vector(e, vectors) for e in experts]
    return torch.stack(rows, dim=1)  # (layers, experts, hidden)


def _expert_vector(expert: Expert, vector: PromptVector) -> torch.Tensor:
    """normalise(mean of positive prompt vectors - mean of negative ones), per layer."""
    positive = torch.stack([vector(p) for p in expert.positive_prompts]).mean(dim=0)
    if expert.negative_prompts:
        positive = positive - torch.stack([vector(p) for p in expert.negative_prompts]).mean(dim=0)
    return torch.nn.functional.normalize(positive, dim=-1)  # (layers, hidden)


def degenerate_layers(gates: torch.Tensor) -> list[int]:
    """Layers whose routed gate rows have a condition number above DEGENERATE_CONDITION.

    Such rows are nearly linearly dependent: the router can barely tell the experts apart.
    """
    if gates.shape[1] < 2:
        return []
    singular = torch.linalg.svdvals(gates.double())  # (layers, min(E, H))
    condition = singular[:, 0] / singular[:, -1].clamp_min(1e-30)
    return [i for i, c in enumerate(condition.tolist()) if c > DEGENERATE_CONDITION]


def _tokenizer(base: Checkpoint) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base.folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"base model '{base.label}': cannot load its tokenizer, which prompt-based gate "
            f"modes need ({str(e).splitlines()[0] if str(e) else type(e).__name__}); add the "
            "tokenizer files or use gate_mode: random"
        ) from e


def _token_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids


def _embedding_vectors(base: Checkpoint, layers: int) -> PromptVector:
    """cheap_embed: a prompt's vector is the sum of its token embeddings, at every layer."""
    tokenizer = _tokenizer(base)
    name = input_embedding_name(base.tensors)
    if name is None:
        raise CheckpointError(f"base model '{base.label}' has no token embedding tensor")
    embedding = base.read(name).float()  # (vocab, hidden): one tensor, not the model

    def vector(prompt: str) -> torch.Tensor:
        ids = _token_ids(tokenizer, prompt)
        total = embedding[ids].sum(dim=0) if ids else torch.zeros(embedding.shape[1])
        return total.expand(layers, -1)

    return vector


class _HiddenStates:
    """hidden: the base model loaded once; a prompt's vector is each layer's input state."""

    def __init__(self, base: Checkpoint, device: torch.device, *, average: bool) -> None:
        self.base = base
        self.device = device
        self.average = average

    def __enter__(self) -> PromptVector:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        self.tokenizer = _tokenizer(self.base)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # alloykit's output is one line per build
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(self.base.folder), dtype=torch.float32
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"base model '{self.base.label}': transformers cannot load it for the hidden "
                f"gate mode ({str(e).splitlines()[0]}); use gate_mode: cheap_embed or random"
            ) from e
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model = model.to(self.device).eval()
        return self._vector

    def __exit__(self, *exc: object) -> None:
        del self.model

    @torch.inference_mode()
    def _vector(self, prompt: str) -> torch.Tensor:
        ids = _token_ids(self.tokenizer, prompt)
        if self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        input_ids = torch.tensor([ids], device=self.device)
        states = self.model(input_ids=input_ids, output_hidden_states=True).hidden_states
        # states[l] enters layer l (states[0] is the embedding output); the last is the output
        per_layer = torch.stack(states[:-1])[:, 0]  # (layers, tokens, hidden)
        chosen = per_layer.mean(dim=1) if self.average else per_layer[:, -1]
        return chosen.float().cpu()


def degenerate_warning(gates: torch.Tensor) -> str | None:
    """A warning naming the layers where the routed gate rows barely differ, or None."""
    bad = degenerate_layers(gates)
    if not bad:
        return None
    return (
        f"gates of {len(bad)} of {gates.shape[0]} layers are nearly degenerate (condition "
        f"number > {DEGENERATE_CONDITION:g}, layers {bad[:8]}); routing may barely tell the "
        "experts apart: give the experts more distinct prompts"
    )
