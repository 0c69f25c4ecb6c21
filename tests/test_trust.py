"""The trust boundary (issue 20, part 6): the cloud file's Ray is not open to the network, torch never
unpickles code, and an `init_from` outside the run's storage is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llm.train.fit import outside_run

from .conftest import ROOT, tiny_config

CONFIG_YAML = ROOT / "cluster" / "config.yaml"


def _commands(key: str) -> list[str]:
    return [str(c) for c in yaml.safe_load(CONFIG_YAML.read_text())[key]]


def test_cloud_head_keeps_the_dashboard_off_the_network_and_asks_for_a_token() -> None:
    head = _commands("head_start_ray_commands")
    start = [c for c in head if "ray start" in c]
    assert len(start) == 1, head
    # Ray's default start command binds the dashboard (its job API) to every interface
    assert "0.0.0.0" not in start[0]
    host = re.search(r"--dashboard-host[= ](\S+)", start[0])
    assert host and host.group(1) == "127.0.0.1", start[0]
    assert "RAY_AUTH_MODE=token" in start[0]


def test_cloud_workers_use_the_same_token() -> None:
    start = [c for c in _commands("worker_start_ray_commands") if "ray start" in c]
    assert len(start) == 1 and "RAY_AUTH_MODE=token" in start[0]
    mounts = yaml.safe_load(CONFIG_YAML.read_text())["file_mounts"]
    assert mounts.get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"


def test_every_torch_load_is_weights_only() -> None:
    calls = []
    for path in (ROOT / "llm").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start():i]))
    assert calls
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


def test_init_from_outside_the_run_is_named(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    inside = Path(cfg.stage_dir("pretrain")) / "ray" / "attempt-0"
    assert outside_run(cfg, str(inside), "llm.pretrain.init_from") is None
    elsewhere = tmp_path / "downloads" / "ckpt"
    line = outside_run(cfg, str(elsewhere), "llm.pretrain.init_from")
    assert line and "\n" not in line and str(elsewhere) in line and "outside this run's storage" in line


def test_init_from_is_always_outside_a_bucket(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "storage=s3://bucket/runs").llm
    assert outside_run(cfg, str(tmp_path), "k") is not None


@pytest.mark.parametrize("uri, path", [("file:///srv/runs", "/srv/runs"), ("file://localhost/srv/runs", "/srv/runs")])
def test_file_uri_storage_is_a_local_path(tmp_path: Path, uri: str, path: str) -> None:
    cfg = tiny_config(tmp_path, f"storage={uri}").llm
    assert cfg.storage == path
    assert cfg.stage_dir("data") == f"{path}/local-tiny/data"
