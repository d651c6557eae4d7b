"""Running merges and recipe searches on a Ray cluster (``--ray``).

Ray (Moritz et al. 2018, "Ray: A Distributed Framework for Emerging AI Applications",
OSDI) schedules the work; alloykit only decides how to split it:

- ``alloykit merge --ray``: :mod:`alloykit.distributed.merge` gives each output shard to one
  Ray task, which writes it into a staging folder beside the output; the driver writes the
  index, config, tokenizer and recipe and renames the folder into place when every shard is
  complete. A task whose worker dies is retried by Ray.
- ``alloykit search --ray``: :mod:`alloykit.distributed.search` keeps a pool of Ray actors,
  each loading the search's tasks once; the optimisers hand them a whole generation (CMA-ES)
  or batch (random search) and tell the study the results in trial order, so the trials are
  those of a serial run.

Ray is an optional extra: ``pip install 'alloykit[distributed]'``. See docs/distributed.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alloykit.errors import AlloyError

log = logging.getLogger("alloykit")
LOCAL = "local"  # --ray local: start a Ray instance on this machine


class DistributedError(AlloyError):
    """Ray is missing or unreachable, or a part of the distributed work failed for good."""


def require_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`DistributedError` naming the extra."""
    try:
        import ray
    except ImportError as e:
        raise DistributedError(
            "--ray needs Ray, which is not installed: pip install 'alloykit[distributed]'"
        ) from e
    return ray


@contextmanager
def ray_cluster(address: str | None = LOCAL, workers: int | None = None) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address`` (or start a local one) for the block.

    ``address`` is ``local`` (a new Ray instance on this machine with ``workers`` CPUs,
    default all of them), ``auto`` (the cluster this machine joined with ``ray start``),
    ``HOST:PORT`` of a head node or a ``ray://HOST:PORT`` client address. When Ray is already
    initialised in this process (a notebook, the tests), that instance is used as it is and
    left running. Yields the ``ray`` module.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if address in (None, LOCAL):
        if workers is not None:
            kwargs["num_cpus"] = workers
        # the workers import alloykit as this process does (a source checkout included)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": _python_path()}}
    else:
        kwargs["address"] = address
    ray_log = logging.getLogger("ray")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)  # Ray's start-up notices are not the command's output
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray instance" if address in (None, LOCAL) else f"'{address}'"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"--ray: cannot start or reach {where} ({first}); check the address "
            "(`ray status` on the head node) or use --ray local"
        ) from e
    finally:
        ray_log.setLevel(level)
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray: Any) -> int:
    """The CPUs the connected cluster has (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def resources(device: str) -> dict[str, float]:
    """What one task or actor asks Ray for: a CPU, and a GPU when it runs on ``cuda``.

    Ray gives each GPU task its own device as ``cuda:0`` (it sets ``CUDA_VISIBLE_DEVICES``),
    so ``cuda:N`` is read as ``cuda``.
    """
    if device.startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": 1}


def ray_device(device: str) -> str:
    """The device name inside a Ray task: its one visible GPU is ``cuda``."""
    return "cuda" if device.startswith("cuda") else device


def _python_path() -> str:
    import alloykit

    source = os.path.dirname(os.path.dirname(os.path.abspath(alloykit.__file__)))
    parts = [source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(os.path.abspath(p) for p in parts))
