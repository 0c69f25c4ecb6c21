"""Shared fixtures: one local Ray per test session, tiny configs on temporary storage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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
# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, one of the variables
# Ray Train passes from the driver to its controller): a run of a tiny model that trains in a second waited
# up to two polls to start and end. 0.3 s cut 2-4 s off each of the suite's ~60 Ray Train runs here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free port with a SQLite backend and local artifacts, waited for (`/health`); one per
    session, shared by the tracking tests and the sweep and compress tests that track their stage."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # The job runner starts seven huey consumers, each importing mlflow: a minute of start-up on two cores.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
