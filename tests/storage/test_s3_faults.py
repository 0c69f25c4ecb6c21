"""Issue 20 parts 1 and 2 on a real S3 API (moto's server): an untrusted manifest stops the stage and changes no
object, a failed commit is recommitted without the work, one writer per stage folder through conditional
PUTs (`If-None-Match: *`, `If-Match`), a stale lease taken over."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from llm import lease, storage
from llm import stage as stage_mod
from llm.errors import StageBusyError, StorageError
from llm.lease import Holder, lease_uri
from llm.loading import load_config
from llm.manifest import ATTEMPT, MANIFEST, read_manifest
from llm.stage import Stage, execute
from tests.conftest import LOCAL_YAML


def _cfg(prefix: str, *overrides: str):
    return load_config(LOCAL_YAML, [f"storage={prefix}", *overrides]).llm


class Body:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, folder: storage.Folder) -> dict:
        self.calls += 1
        (folder.local / "part-0.txt").write_text("hello")
        storage.write_text(folder.path("remote.txt"), "written by a task")
        return {"run": self.calls}


DATA = Stage("data", "test", run=lambda cfg, force=False: execute(cfg, DATA, Body(), force=force), sections=("data",))


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    monkeypatch.setattr(storage, "SETTLE_S", 0.05)
    monkeypatch.setattr(lease, "SETTLE_S", 0.05)


def _objects(prefix: str) -> dict[str, bytes]:
    return {rel: storage.read_bytes(storage.join(prefix, rel)) for rel in storage.list_files(prefix)}


def test_s3_unknown_field_is_committed_and_a_damaged_manifest_changes_nothing(s3_prefix: str) -> None:
    cfg, body = _cfg(s3_prefix), Body()
    uri = execute(cfg, DATA, body).path
    where = storage.join(uri, MANIFEST)
    data = json.loads(storage.read_text(where))
    storage.write_text(where, json.dumps({**data, "signature": 1}))
    assert execute(cfg, DATA, body).skipped and body.calls == 1  # the repro, on S3

    storage.write_text(storage.join(uri, "remote.txt"), "x")  # a listed object truncated
    before = _objects(s3_prefix)
    with pytest.raises(StorageError, match=rf"^{where}: lists remote.txt at 17 bytes, but it has 1 now; nothing"):
        execute(cfg, DATA, body)
    storage.write_text(where, json.dumps({**data, "schema": 99}))
    before = _objects(s3_prefix)
    with pytest.raises(StorageError, match=rf"^{where}: was written by a newer llmray \(manifest schema 99"):
        execute(cfg, DATA, body)
    assert _objects(s3_prefix) == before and body.calls == 1  # nothing set aside, deleted or rewritten


def test_s3_failed_commit_is_recommitted_without_the_work(s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, body = _cfg(s3_prefix), Body()
    real = stage_mod.write_manifest

    def s3_down(*args: object, **kwargs: object) -> None:
        raise OSError("When uploading object: AWS Error SERVICE_UNAVAILABLE during PutObject operation")

    monkeypatch.setattr(stage_mod, "write_manifest", s3_down)
    with pytest.raises(StorageError, match="the commit failed .*SERVICE_UNAVAILABLE.*rerun to commit them"):
        execute(cfg, DATA, body)
    uri = cfg.stage_dir("data")
    assert ATTEMPT in storage.list_files(uri) and MANIFEST not in storage.list_files(uri)
    monkeypatch.setattr(stage_mod, "write_manifest", real)
    result = execute(cfg, DATA, body)
    assert not result.skipped and body.calls == 1 and result.metrics["run"] == 1
    manifest = read_manifest(uri, verify=True)
    assert manifest is not None and set(manifest.files) == {"part-0.txt", "remote.txt"}
    assert ATTEMPT not in storage.list_files(uri)


@pytest.mark.parametrize("conditional", ["boto3", "best effort"])
def test_s3_conditional_writes(s3_prefix: str, monkeypatch: pytest.MonkeyPatch, conditional: str) -> None:
    if conditional == "best effort":  # GCS, or S3 without boto3: write, then read back
        monkeypatch.setattr(storage, "_s3_client", lambda uri: None)
    else:
        assert storage._s3_client(s3_prefix) is not None
    target = f"{s3_prefix}/run/data._LEASE.json"
    assert storage.create_new(target, b"a") and not storage.create_new(target, b"b")
    assert storage.read_bytes(target) == b"a"
    assert not storage.replace_if(target, b"z", b"c") and storage.replace_if(target, b"a", b"c")
    assert storage.read_bytes(target) == b"c"
    assert not storage.remove_if(target, b"a") and storage.remove_if(target, b"c")
    assert storage.size(target) is None and not storage.replace_if(target, b"c", b"d")


def test_s3_create_new_is_exclusive_under_a_race(s3_prefix: str) -> None:
    target = f"{s3_prefix}/race._LEASE.json"
    won: list[int] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        if storage.create_new(target, str(i).encode()):
            won.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and storage.read_bytes(target) == str(won[0]).encode()


def test_s3_a_second_run_refuses_naming_the_holder(s3_prefix: str) -> None:
    cfg = _cfg(s3_prefix)
    started, go, errors = threading.Event(), threading.Event(), []

    def slow(folder: storage.Folder) -> dict:
        started.set()
        go.wait(60)
        return Body()(folder)

    def first() -> None:
        try:
            execute(cfg, DATA, slow)
        except Exception as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(StageBusyError, match=rf"^{cfg.stage_dir('data')}: another run of data holds it "
                                                 rf"\(host {re.escape(socket.gethostname())}, pid \d+, since "):
            execute(cfg, DATA, Body())
    finally:
        go.set()
        thread.join(60)
    assert not errors and storage.size(lease_uri(cfg.stage_dir("data"))) is None
    assert execute(cfg, DATA, Body()).skipped


def test_s3_stale_lease_is_taken_over(s3_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(s3_prefix)
    uri = cfg.stage_dir("data")
    old = time.time() - 100 * lease.HEARTBEAT_S
    storage.write_bytes(lease_uri(uri), Holder("other", "gpu-node-7", 4242, old, old, "data").encode())
    assert not storage.exists(uri)  # the lease beside the folder is not the folder
    result = execute(cfg, DATA, Body())
    assert not result.skipped and read_manifest(uri) is not None
    out = capsys.readouterr().out
    assert re.search(r"data: took over the lease of the run on host gpu-node-7, pid 4242, since .* "
                     r"\(no heartbeat for \d+s\)", out) and "moved to" not in out
    assert storage.size(lease_uri(uri)) is None
