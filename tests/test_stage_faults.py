"""Faults against the stage contract: no unreadable manifest, failed commit or transient storage error undoes a
commit (issue 20, part 1). Cheap stage bodies through `execute`, no Ray."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from llm import stage as stage_mod
from llm import storage
from llm.errors import StorageError
from llm.manifest import ATTEMPT, MANIFEST, SCHEMA_VERSION, read_manifest
from llm.stage import Stage, StageResult, execute

from .conftest import tiny_config


def _unused(cfg: object, force: bool = False) -> StageResult:
    raise AssertionError("these stages run through execute() in the tests")


DATA = Stage("data", "test data stage", _unused, sections=("data",))
TRAINING = Stage("pretrain", "test training stage", _unused, sections=("pretrain",), resumable=True)


class Body:
    """A stage body that counts its calls and writes two files."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, folder: storage.Folder) -> dict:
        self.calls += 1
        (folder.local / "out.txt").write_text("trained weights")
        (folder.local / "sub").mkdir(exist_ok=True)
        (folder.local / "sub" / "b.bin").write_bytes(b"\x01" * 100)
        return {"run": self.calls}


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)


def _committed(tmp_path: Path):
    cfg = tiny_config(tmp_path).llm
    body = Body()
    first = execute(cfg, DATA, body)
    assert not first.skipped and body.calls == 1
    return cfg, Path(first.path), body


def _edit_manifest(folder: Path, **changes: object) -> None:
    data = json.loads((folder / MANIFEST).read_text())
    data.update(changes)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2))


def test_unknown_manifest_field_is_still_committed(tmp_path: Path) -> None:
    """The issue's repro: a field a newer llmray adds is not a torn manifest (it used to rerun the stage and
    remove the manifest)."""
    cfg, folder, body = _committed(tmp_path)
    _edit_manifest(folder, signature=1)
    again = execute(cfg, DATA, body)
    assert again.skipped and body.calls == 1 and again.metrics["run"] == 1
    assert json.loads((folder / MANIFEST).read_text())["signature"] == 1  # left as it was


def test_manifest_without_schema_field_reads_as_schema_1(tmp_path: Path) -> None:
    cfg, folder, body = _committed(tmp_path)
    data = json.loads((folder / MANIFEST).read_text())
    del data["schema"]
    (folder / MANIFEST).write_text(json.dumps(data))
    assert execute(cfg, DATA, body).skipped and body.calls == 1


def _break(kind: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Damage a committed folder one way; returns what the error line must say."""
    if kind == "torn":
        text = (folder / MANIFEST).read_text()
        (folder / MANIFEST).write_text(text[: len(text) // 2])
        return "is not valid JSON"
    if kind == "newer schema":
        _edit_manifest(folder, schema=SCHEMA_VERSION + 1, layout="v2")
        return rf"was written by a newer llmray \(manifest schema {SCHEMA_VERSION + 1}"
    if kind == "truncated file":
        (folder / "sub" / "b.bin").write_bytes(b"\x01" * 10)
        return "lists sub/b.bin at 100 bytes, but it has 10 now"
    if kind == "not a manifest":
        (folder / MANIFEST).write_text("[1, 2]")
        return "is not a JSON object"
    assert kind == "unreadable"  # EACCES; tests run as root here, where chmod 000 would not stop a read
    real = storage.read_bytes

    def denied(uri: str | Path) -> bytes:
        if str(uri).endswith(MANIFEST):
            raise PermissionError(errno.EACCES, "Permission denied", str(uri))
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", denied)
    return r"cannot be read \(\[Errno 13\] Permission denied"


@pytest.mark.parametrize("kind", ["torn", "newer schema", "truncated file", "not a manifest", "unreadable"])
def test_untrusted_manifest_stops_the_stage_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    cfg, folder, body = _committed(tmp_path)
    why = _break(kind, folder, monkeypatch)
    before = _snapshot(folder.parent)
    with pytest.raises(StorageError, match=rf"^{folder / MANIFEST}: {why}.*; nothing was changed \(") as caught:
        execute(cfg, DATA, body)
    assert "\n" not in str(caught.value)
    assert body.calls == 1  # the body did not run again
    monkeypatch.undo()
    assert _snapshot(folder.parent) == before  # nothing moved aside, removed or rewritten (no lease left behind)
    assert "moved to" not in capsys.readouterr().out


def test_failed_commit_keeps_the_attempt_and_the_rerun_only_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path).llm
    body = Body()
    real = stage_mod.write_manifest

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stage_mod, "write_manifest", disk_full)
    with pytest.raises(StorageError, match=rf"{MANIFEST}: the commit failed \(\[Errno 28\] No space left.*"
                                           "rerun to commit them without redoing the work"):
        execute(cfg, TRAINING, body)
    folder = Path(cfg.stage_dir("pretrain"))
    assert not (folder / MANIFEST).exists() and (folder / ATTEMPT).exists() and (folder / "out.txt").exists()
    assert json.loads((folder / ATTEMPT).read_text())["finished"]["metrics"]["run"] == 1

    monkeypatch.setattr(stage_mod, "write_manifest", real)
    again = execute(cfg, TRAINING, body)
    assert body.calls == 1  # committed, not trained again
    assert not again.skipped and again.metrics["run"] == 1 and again.kept_aside is None
    manifest = read_manifest(folder, verify=True)
    assert manifest is not None and set(manifest.files) == {"out.txt", "sub/b.bin"}  # the marker is not listed
    assert not (folder / ATTEMPT).exists()
    assert "its last run finished but did not commit; committing it now" in capsys.readouterr().out
    assert execute(cfg, TRAINING, body).skipped and body.calls == 1


def test_a_finished_attempt_of_another_config_is_not_committed(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config(tmp_path).llm
    body = Body()
    monkeypatch.setattr(stage_mod, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(OSError("S3 error")))
    with pytest.raises(StorageError):
        execute(cfg, DATA, body)
    monkeypatch.undo()
    changed = tiny_config(tmp_path, "data.min_chars=1").llm
    result = execute(changed, DATA, body)
    assert body.calls == 2 and result.kept_aside is not None  # ran for the new config; the old files kept aside
    assert (Path(result.kept_aside) / "out.txt").exists()


def _flaky(monkeypatch: pytest.MonkeyPatch, fails: int) -> list[str]:
    """storage.read_bytes of a manifest fails `fails` times with a timeout, as a throttled store does."""
    real, seen = storage.read_bytes, []

    def read(uri: str | Path) -> bytes:
        if str(uri).endswith(MANIFEST) and len(seen) < fails:
            seen.append(str(uri))
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", read)
    return seen


def test_transient_read_errors_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, folder, body = _committed(tmp_path)
    seen = _flaky(monkeypatch, storage.RETRIES - 1)
    assert execute(cfg, DATA, body).skipped and body.calls == 1 and len(seen) == storage.RETRIES - 1


def test_lasting_storage_errors_stop_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, folder, body = _committed(tmp_path)
    before = _snapshot(folder.parent)
    _flaky(monkeypatch, 100)
    with pytest.raises(StorageError, match=rf"^{folder / MANIFEST}: reading the manifest failed "
                                           rf"{storage.RETRIES} times; the last error: .*timed out$"):
        execute(cfg, DATA, body)
    monkeypatch.undo()
    assert body.calls == 1 and _snapshot(folder.parent) == before


def test_transient_write_of_the_manifest_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path).llm
    real, fails = storage.write_bytes, []

    def write(uri: str | Path, data: bytes) -> None:
        if str(uri).endswith(MANIFEST) and not fails:
            fails.append(uri)
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write)
    result = execute(cfg, DATA, Body())
    assert fails and not result.skipped and read_manifest(result.path) is not None
