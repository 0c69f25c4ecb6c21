"""The filesystem layer and the stage contract on a real S3 API (moto's server): commit, skip, not-done,
set-aside keeping every object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm import storage
from llm.errors import StageInputError, StorageError
from llm.loading import load_config
from llm.manifest import MANIFEST, read_manifest
from llm.report.html import write_report
from llm.report.status import stage_status
from llm.stage import Stage, execute, stage_input
from tests.conftest import LOCAL_YAML


def test_files_round_trip_and_move(s3_prefix: str, tmp_path: Path) -> None:
    storage.write_text(storage.join(s3_prefix, "a", "x.json"), '{"x": 1}')
    storage.write_bytes(storage.join(s3_prefix, "a", "sub", "y.bin"), b"12345")
    assert storage.read_text(f"{s3_prefix}/a/x.json") == '{"x": 1}'
    assert storage.list_files(f"{s3_prefix}/a") == {"x.json": 8, "sub/y.bin": 5}
    assert storage.exists(f"{s3_prefix}/a") and not storage.exists(f"{s3_prefix}/b")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_prefix}/a/none.json")
    storage.move_tree(f"{s3_prefix}/a", f"{s3_prefix}/b")
    assert storage.list_files(f"{s3_prefix}/b") == {"x.json": 8, "sub/y.bin": 5}
    assert storage.list_files(f"{s3_prefix}/a") == {} and not storage.exists(f"{s3_prefix}/a")
    (tmp_path / "up" / "d").mkdir(parents=True)
    (tmp_path / "up" / "d" / "z.txt").write_text("zz")
    storage.upload(tmp_path / "up", f"{s3_prefix}/c")
    got = storage.download(f"{s3_prefix}/c", tmp_path / "down")
    assert (got / "d" / "z.txt").read_text() == "zz"


def test_cached_copy_checks_the_committed_sizes(s3_prefix: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMRAY_CACHE", str(tmp_path / "cache"))
    storage.write_text(f"{s3_prefix}/m/config.json", "{}")
    copy = storage.cached_copy(f"{s3_prefix}/m", {"config.json": {"size": 2}})
    assert (copy / "config.json").read_text() == "{}"
    with pytest.raises(OSError, match="differs from the committed one"):
        storage.cached_copy(f"{s3_prefix}/m", {"config.json": {"size": 3}})


def _cfg(prefix: str, *overrides: str):
    return load_config(LOCAL_YAML, [f"storage={prefix}", *overrides]).llm


def _body(folder: storage.Folder) -> dict[str, int]:
    (folder.local / "out").mkdir()
    (folder.local / "out" / "part-0.txt").write_text("hello")
    storage.write_text(folder.path("remote.txt"), "written by a task")  # as a Ray task does
    return {"rows": 1}


DATA = Stage("data", "test", run=lambda cfg, force=False: execute(cfg, DATA, _body, force=force), sections=("data",))


def test_stage_commit_skip_and_not_done_on_s3(s3_prefix: str) -> None:
    cfg = _cfg(s3_prefix)
    first = execute(cfg, DATA, _body)
    uri = cfg.stage_dir("data")
    assert first.path == uri and not first.skipped
    manifest = read_manifest(uri)
    assert manifest is not None and set(manifest.files) == {"out/part-0.txt", "remote.txt"}
    assert manifest.files["out/part-0.txt"]["size"] == 5
    assert "_ATTEMPT.json" not in storage.list_files(uri)
    assert execute(cfg, DATA, _body).skipped
    assert (stage_input(cfg, "data").fetch("out") / "part-0.txt").read_text() == "hello"  # a verified local copy

    storage.write_text(f"{uri}/remote.txt", "changed size")  # a listed object no longer as committed
    with pytest.raises(StorageError, match="lists remote.txt at 17 bytes, but it has 12 now"):
        read_manifest(uri)
    storage.remove_file(f"{uri}/remote.txt")  # a listed object missing: a damaged commit, never "not done"
    with pytest.raises(StorageError, match=r"lists remote.txt \(17 bytes\), which is missing"):
        stage_input(cfg, "data")
    with pytest.raises(StorageError, match="nothing was changed"):
        execute(cfg, DATA, _body)
    storage.remove_file(f"{uri}/{MANIFEST}")  # no manifest: not done
    with pytest.raises(StageInputError, match="no complete data output"):
        stage_input(cfg, "data")
    assert not execute(cfg, DATA, _body).skipped  # it runs again


def test_changed_config_keeps_the_old_objects_aside(s3_prefix: str) -> None:
    cfg = _cfg(s3_prefix)
    execute(cfg, DATA, _body)
    uri = cfg.stage_dir("data")
    before = storage.list_files(uri)
    changed = _cfg(s3_prefix, "data.min_chars=7")
    result = execute(changed, DATA, _body)
    assert not result.skipped and result.kept_aside and result.kept_aside.startswith(f"{uri}.")
    assert storage.list_files(result.kept_aside) == before  # every object, manifest included, at the new prefix
    old = read_manifest(result.kept_aside)
    assert old is not None and json.loads(storage.read_text(f"{result.kept_aside}/{MANIFEST}"))["config"]
    assert read_manifest(uri) is not None and read_manifest(uri).config_hash != old.config_hash


def test_status_and_report_read_the_store(s3_prefix: str) -> None:
    loaded = load_config(LOCAL_YAML, [f"storage={s3_prefix}"])
    cfg = loaded.llm
    assert stage_status(cfg, DATA).state == "not started"
    execute(cfg, DATA, _body)
    assert stage_status(cfg, DATA).state == "done"
    out = write_report(loaded)
    assert out == f"{s3_prefix}/local-tiny/report.html" and "llmray run local-tiny" in storage.read_text(out)
