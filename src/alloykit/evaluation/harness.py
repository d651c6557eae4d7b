"""lm-evaluation-harness tasks on a model held in memory (optional extra ``eval``).

:func:`harness_model` wraps a skeleton (so a merge config is merged in memory, nothing written)
as an lm-eval language model; its three request types are answered with alloykit's own batched
scoring and generation, tokenised as lm-eval's Hugging Face model does (no special tokens added;
trailing context spaces moved to the continuation; an empty context is the BOS, else EOS,
token), so the scores agree with ``lm_eval --model hf`` on the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alloykit.errors import AlloyError
from alloykit.evaluation import runner
from alloykit.evaluation.model import Skeleton, resolve_source
from alloykit.evaluation.score import EvalOptions, encode_pair, encode_text, skeleton_for

DEFAULT_MAX_NEW_TOKENS = 256  # lm-eval's default when a task does not set max_gen_toks


def _lm_base() -> Any:
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise AlloyError(
            "lm-evaluation-harness is not installed: pip install 'alloykit[eval]'"
        ) from e
    return LM


def harness_model(
    model: Any, options: EvalOptions | None = None, *, like: str | Path | None = None
) -> Any:
    """An ``lm_eval.api.model.LM`` scoring ``model`` (folder, repo id, merge config or state dict
    with ``like``) with alloykit's runner.

    Example:
        >>> import lm_eval  # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model=harness_model("merge.yml"), tasks=["hellaswag"])  # doctest: +SKIP
    """
    settings = options or EvalOptions()
    base = _lm_base()
    source = resolve_source(model, like=like, merge_options=settings.merge)
    skeleton = skeleton_for(source, settings)

    class AlloyLM(base):  # type: ignore[misc, valid-type]
        """lm-eval's three request types, answered by alloykit's runner."""

        def __init__(self) -> None:
            super().__init__()
            self.skeleton: Skeleton = skeleton
            self.name = source.name
            self.recipe_hash = source.recipe_hash
            self.max_length = settings.max_length or skeleton.max_length
            self.batching = skeleton.batching(settings.batch_size)

        def loglikelihood(
            self, requests: Sequence[Any], disable_tqdm: bool = False
        ) -> list[tuple[float, bool]]:
            pairs = [
                encode_pair(self.skeleton.tokenizer, context, continuation, self.skeleton.prefix_id)
                for context, continuation in (r.args for r in requests)
            ]
            return self._score(pairs)

        def loglikelihood_rolling(
            self, requests: Sequence[Any], disable_tqdm: bool = False
        ) -> list[float]:
            windows: list[tuple[list[int], list[int]]] = []
            owners: list[int] = []
            for number, request in enumerate(requests):
                tokens = encode_text(self.skeleton.tokenizer, request.args[0])
                for window in runner.rolling_windows(
                    tokens, self.skeleton.prefix_id, self.max_length
                ):
                    windows.append(window)
                    owners.append(number)
            totals = [0.0] * len(requests)
            for (value, _), owner in zip(self._score(windows), owners, strict=True):
                totals[owner] += value
            return totals

        def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
            tokenizer = self.skeleton.tokenizer
            outputs: list[str] = []
            # requests differ in their settings; group equal settings into one batched call
            groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
            for number, request in enumerate(requests):
                settings = dict(request.args[1]) if len(request.args) > 1 else {}
                until = settings.get("until") or []
                stop = tuple([until] if isinstance(until, str) else until)
                max_new = int(settings.get("max_gen_toks", DEFAULT_MAX_NEW_TOKENS))
                groups.setdefault((stop, max_new), []).append(number)
            outputs = [""] * len(requests)
            for (stop, max_new), numbers in groups.items():
                eos = tokenizer.eos_token
                stops = [*stop, eos] if eos else list(stop)
                texts = runner.generate(
                    self.skeleton.causal_lm("harness"),
                    tokenizer,
                    [
                        encode_text(tokenizer, requests[n].args[0]) or [self.skeleton.prefix_id]
                        for n in numbers
                    ],
                    max_new_tokens=max_new,
                    stop=stops,
                    pad_id=self.skeleton.pad_id,
                    max_length=self.max_length,
                    batching=self.batching,
                )
                for n, text in zip(numbers, texts, strict=True):
                    outputs[n] = text
            return outputs

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            return runner.loglikelihoods(
                self.skeleton.causal_lm("harness"),
                pairs,
                pad_id=self.skeleton.pad_id,
                max_length=self.max_length,
                batching=self.batching,
            )

    return AlloyLM()


def run_harness(
    model: Any,
    tasks: Sequence[str],
    options: EvalOptions | None = None,
    *,
    limit: int | None = None,
    include: str | Path | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on ``model`` in memory; returns
    ``{"model", "recipe_hash", "results"}`` with lm-eval's per-task metrics.

    ``include`` is a folder of extra task YAMLs (for example tasks on local files).
    """
    lm = harness_model(model, options)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include is not None:  # indexing only the local folder is much faster than every task
        manager = TaskManager(include_path=str(include), include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include) if include is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise AlloyError(
            f"--harness-task '{unknown[0]}' is not an lm-evaluation-harness task"
            + (f" (nor in {include})" if include else "; pass --harness-include for local tasks")
        )
    output = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=False
    )
    results = (output or {}).get("results", {})
    return {"model": lm.name, "recipe_hash": lm.recipe_hash, "results": results}
