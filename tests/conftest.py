"""Shared fixtures: one local Ray per test session, tiny configs on temporary storage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm.config import LoadedConfig
from llm.loading import load_config

ROOT = Path(__file__).resolve().parent.parent
LOCAL_YAML = ROOT / "cluster" / "local.yaml"

# Unit tests start their own throwaway Ray; token auth stays on everywhere else (Ray's default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (ray.init costs ~9 s here). 4 logical CPUs on 2 cores, as
    cluster/local.yaml asks, so Train workers and Ray Data tasks are scheduled together."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def tiny_config(tmp_path: Path, *overrides: str) -> LoadedConfig:
    """cluster/local.yaml with storage under `tmp_path` and any extra dotted overrides."""
    return load_config(LOCAL_YAML, [f"storage={tmp_path / 'runs'}", *overrides])


@pytest.fixture
def local_cfg(tmp_path: Path) -> LoadedConfig:
    return tiny_config(tmp_path)
