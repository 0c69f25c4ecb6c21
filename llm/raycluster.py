"""Reaching Ray: the configured address, a running cluster, or a local one sized for small machines."""

from __future__ import annotations

import os
from typing import Any

from llm.config import PipelineConfig


def connect(cfg: PipelineConfig, **init_kwargs: Any) -> None:
    """`ray.init` once per process.

    Order: `ray.address` from the config, else `RAY_ADDRESS` (set inside `ray job submit`), else a
    cluster already running on this machine, else a new local Ray with `ray.num_cpus` logical CPUs
    (more than the cores, so Train workers and Ray Data's tasks both get scheduled on 2 cores).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs: dict[str, Any] = {"log_to_driver": True, **init_kwargs}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    try:
        ray.init(address="auto", **kwargs)
        return
    except (ConnectionError, RuntimeError, ValueError):
        pass
    ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
