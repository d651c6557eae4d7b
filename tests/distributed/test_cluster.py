"""Connecting to Ray: an instance already running is used and left running; what tasks ask for."""

from __future__ import annotations

from typing import Any

from alloykit.distributed import cluster_cpus, ray_cluster, ray_device, resources
from tests.distributed.conftest import WORKERS


def test_a_running_instance_is_used_and_left_running(ray_instance: Any) -> None:
    with ray_cluster("local", workers=8) as ray:
        assert ray is ray_instance
        assert cluster_cpus(ray) == WORKERS  # the running one, not a new one of 8
    assert ray_instance.is_initialized()


def test_tasks_ask_for_a_gpu_only_on_cuda() -> None:
    assert resources("cpu") == {"num_cpus": 1}
    assert resources("cuda:1") == {"num_cpus": 1, "num_gpus": 1}
    assert (ray_device("cuda:1"), ray_device("cuda"), ray_device("cpu")) == ("cuda", "cuda", "cpu")
