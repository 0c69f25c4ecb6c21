"""One writer per stage folder (issue 20, part 2): a second run refuses naming the holder or waits, a stale
lease is taken over, a lost lease never commits. Cheap stage bodies through `execute`, no Ray."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llm import lease, storage
from llm.cli import build_parser
from llm.errors import StageBusyError
from llm.lease import Holder, lease_uri
from llm.manifest import MANIFEST, read_manifest
from llm.stage import Stage, StageResult, execute

from .conftest import tiny_config


def _unused(cfg: object, force: bool = False) -> StageResult:
    raise AssertionError("these stages run through execute() in the tests")


DATA = Stage("data", "test data stage", _unused, sections=("data",))


def _write(folder: storage.Folder) -> dict:
    (folder.local / "out.txt").write_text("done")
    return {"rows": 1}


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "SETTLE_S", 0.01)
    monkeypatch.setattr(lease, "WAIT_POLL_S", 0.05)


def _hold_until_released(storage_root: str, started: str, go: str) -> None:
    """A run of the data stage whose body waits for the test to let it finish."""
    from tests.conftest import tiny_config as config

    def body(folder: storage.Folder) -> dict:
        Path(started).write_text(str(os.getpid()))
        deadline = time.time() + 60
        while not Path(go).exists() and time.time() < deadline:
            time.sleep(0.02)
        return _write(folder)

    execute(config(Path(storage_root)).llm, DATA, body)


def test_a_second_run_refuses_naming_the_holder(tmp_path: Path) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    first = mp.get_context("fork").Process(target=_hold_until_released, args=(str(tmp_path), str(started), str(go)))
    first.start()
    try:
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert started.exists()
        cfg = tiny_config(tmp_path).llm
        ran = []
        with pytest.raises(StageBusyError) as caught:
            execute(cfg, DATA, lambda f: ran.append(1) or {})
        line = str(caught.value)
        assert "\n" not in line and not ran
        assert line.startswith(f"{cfg.stage_dir('data')}: another run of data holds it (host {socket.gethostname()}, "
                               f"pid {first.pid}, since 20")
        assert "--wait" in line
        assert not (Path(cfg.stage_dir("data")) / MANIFEST).exists()  # the first run's folder untouched
    finally:
        go.write_text("go")
        first.join(60)
    assert first.exitcode == 0
    assert not Path(lease_uri(cfg.stage_dir("data"))).exists()  # given back at the end
    assert execute(cfg, DATA, lambda f: ran.append(1) or {}).skipped and not ran


def _plant(folder: str, **fields: object) -> Holder:
    """A lease written by some other run."""
    now = time.time()
    holder = Holder(**{"owner": "other", "host": "gpu-node-7", "pid": 4242, "started": now - 3600,
                       "heartbeat": now, "stage": "data", **fields})
    Path(lease_uri(folder)).parent.mkdir(parents=True, exist_ok=True)
    Path(lease_uri(folder)).write_bytes(holder.encode())
    return holder


def test_a_live_lease_of_another_host_refuses(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    holder = _plant(cfg.stage_dir("data"))
    with pytest.raises(StageBusyError, match=r"holds it \(host gpu-node-7, pid 4242, since .* UTC; last heartbeat"):
        execute(cfg, DATA, _write)
    assert Path(lease_uri(cfg.stage_dir("data"))).read_bytes() == holder.encode()  # not touched


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("how", ["process gone", "no heartbeat"])
def test_a_stale_lease_is_taken_over_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    cfg = tiny_config(tmp_path).llm
    if how == "process gone":
        _plant(cfg.stage_dir("data"), host=socket.gethostname(), pid=_dead_pid())
        why = "its process is gone"
    else:
        _plant(cfg.stage_dir("data"), heartbeat=time.time() - 10 * lease.HEARTBEAT_S)
        why = r"no heartbeat for \d+s"
    result = execute(cfg, DATA, _write)
    assert not result.skipped and read_manifest(result.path) is not None
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "took over the lease" in line]) == 1
    assert re.search(rf"data: took over the lease of the run on host .*, pid \d+, since .* \({why}\)", out)
    assert not Path(lease_uri(cfg.stage_dir("data"))).exists()


def test_wait_waits_for_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path).llm
    _plant(cfg.stage_dir("data"))
    gone = threading.Timer(0.4, lambda: Path(lease_uri(cfg.stage_dir("data"))).unlink())
    monkeypatch.setenv("LLMRAY_WAIT", "1")
    gone.start()
    t0 = time.time()
    result = execute(cfg, DATA, _write)
    assert not result.skipped and time.time() - t0 >= 0.3
    assert "data: waiting for the run on host gpu-node-7, pid 4242" in capsys.readouterr().out


def test_the_cli_wait_flag_sets_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMRAY_WAIT", raising=False)
    assert not lease.waiting()
    assert build_parser().parse_args(["data", "--wait"]).wait
    monkeypatch.setenv("LLMRAY_WAIT", "1")
    assert lease.waiting()


def test_heartbeat_refreshes_and_the_lease_stays_out_of_the_manifest(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path).llm
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    where = Path(lease_uri(cfg.stage_dir("data")))
    seen: list[dict] = []

    def body(folder: storage.Folder) -> dict:
        seen.append(json.loads(where.read_text()))
        time.sleep(0.4)
        seen.append(json.loads(where.read_text()))
        return _write(folder)

    result = execute(cfg, DATA, body)
    assert seen[0]["owner"] == seen[1]["owner"] and seen[1]["heartbeat"] > seen[0]["heartbeat"]
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    manifest = read_manifest(result.path)
    assert manifest is not None and set(manifest.files) == {"out.txt"} and not where.exists()


def test_a_run_that_lost_its_lease_does_not_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path).llm
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    where = Path(lease_uri(cfg.stage_dir("data")))

    def body(folder: storage.Folder) -> dict:
        _plant(cfg.stage_dir("data"))  # another run decided this one was stale and took over
        time.sleep(0.2)
        return _write(folder)

    with pytest.raises(StageBusyError, match="this run lost its lease to the run on host gpu-node-7, pid 4242.*"
                                             "did not commit"):
        execute(cfg, DATA, body)
    assert not (Path(cfg.stage_dir("data")) / MANIFEST).exists()
    assert json.loads(where.read_text())["owner"] == "other"  # the new holder's lease is left alone


def test_the_lease_is_given_back_when_the_body_fails(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm

    def boom(folder: storage.Folder) -> dict:
        assert Path(lease_uri(cfg.stage_dir("data"))).exists()
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        execute(cfg, DATA, boom)
    assert not Path(lease_uri(cfg.stage_dir("data"))).exists()
    assert not execute(cfg, DATA, _write).skipped


def test_exclusive_create_on_disk(tmp_path: Path) -> None:
    target = tmp_path / "x" / "lease.json"
    assert storage.create_new(target, b"a") and not storage.create_new(target, b"b")
    assert target.read_bytes() == b"a" and sorted(p.name for p in target.parent.iterdir()) == ["lease.json"]
    assert not storage.replace_if(target, b"z", b"c") and storage.replace_if(target, b"a", b"c")
    assert not storage.remove_if(target, b"a") and storage.remove_if(target, b"c") and not target.exists()
