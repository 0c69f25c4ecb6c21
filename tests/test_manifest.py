"""The stage contract: a manifest written last and atomically; torn or missing means not done."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from llm import storage
from llm.errors import StageInputError, StorageError
from llm.manifest import CHECKSUMS, MANIFEST, file_sha256, is_done, manifest_hash, read_manifest, write_manifest
from llm.stage import Stage, StageResult, config_hash, execute, stage_input

from .conftest import tiny_config


def _unused(cfg: object, force: bool = False) -> StageResult:
    raise AssertionError("these stages run through execute() in the tests")


DATA = Stage("data", "test data stage", _unused, sections=("data",))
PRETRAIN = Stage("pretrain", "test training stage", _unused, sections=("pretrain",), inputs=("data",))
TRAINING = Stage("pretrain", "test training stage", _unused, sections=("pretrain",), resumable=True)
SOLO = Stage("pretrain", "test stage without inputs", _unused, sections=("pretrain",))


def _write_files(folder: Path) -> None:
    (folder / "a.txt").write_text("alpha")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "b.bin").write_bytes(b"\x00" * 1000)


def test_manifest_roundtrip(tmp_path: Path) -> None:
    _write_files(tmp_path)
    m = write_manifest(tmp_path, "data", "abc", {"x": "1"}, {"docs": 3})
    assert set(m.files) == {"a.txt", "sub/b.bin"}
    assert m.files["sub/b.bin"]["size"] == 1000
    back = read_manifest(tmp_path, verify=True)
    assert back is not None and back.metrics == {"docs": 3} and back.config_hash == "abc"
    assert is_done(tmp_path, "abc", {"x": "1"})
    assert not is_done(tmp_path, "abd", {"x": "1"})
    assert not is_done(tmp_path, "abc", {"x": "2"})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(MANIFEST)] == [MANIFEST]


def test_a_manifest_that_cannot_be_trusted_is_an_error_not_absent(tmp_path: Path) -> None:
    """Only a missing manifest means "not done"; a torn one, or one whose listed files changed, stops the
    reader in one line naming the file (it used to read as not done, and the stage then reran)."""
    _write_files(tmp_path)
    write_manifest(tmp_path, "data", "abc", {}, {})
    text = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(text[: len(text) // 2])  # torn
    with pytest.raises(StorageError, match=rf"{MANIFEST}: is not valid JSON .*nothing was changed"):
        read_manifest(tmp_path)
    with pytest.raises(StorageError, match="is not valid JSON"):
        is_done(tmp_path, "abc", {})
    write_manifest(tmp_path, "data", "abc", {}, {})
    (tmp_path / "a.txt").write_text("changed!")  # a listed file changed size
    with pytest.raises(StorageError, match="lists a.txt at 5 bytes, but it has 8 now"):
        read_manifest(tmp_path)
    (tmp_path / "a.txt").write_text("alphx")  # same size, other bytes: only a verify catches it
    assert read_manifest(tmp_path) is not None
    with pytest.raises(StorageError, match="lists a.txt with another sha256"):
        read_manifest(tmp_path, verify=True)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(StorageError, match=r"lists a.txt \(5 bytes\), which is missing"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).unlink()
    assert read_manifest(tmp_path) is None and manifest_hash(tmp_path) is None  # absent: simply not done


def _slow_commit(folder: str) -> None:
    """Write many files, then the manifest; the parent kills this process mid-way."""
    f = Path(folder)
    for i in range(10_000):
        (f / f"part-{i}.bin").write_bytes(os.urandom(1024))
        time.sleep(0.001)
    write_manifest(f, "data", "h", {}, {})


def test_interrupted_write_leaves_no_manifest(tmp_path: Path) -> None:
    proc = mp.get_context("fork").Process(target=_slow_commit, args=(str(tmp_path),))
    proc.start()
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert any(tmp_path.glob("part-*.bin"))
    assert not (tmp_path / MANIFEST).exists()
    assert read_manifest(tmp_path) is None and not is_done(tmp_path, "h", {})


def test_execute_skips_when_done_and_reruns_on_change(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm
    calls = []

    def body(stage_folder: storage.Folder) -> dict:
        folder = stage_folder.local
        calls.append(folder)
        (folder / "out.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    first = execute(cfg, DATA, body)
    assert not first.skipped and first.metrics["n"] == 1
    again = execute(cfg, DATA, body)
    assert again.skipped and again.metrics["n"] == 1 and len(calls) == 1
    forced = execute(cfg, DATA, body, force=True)
    assert not forced.skipped and len(calls) == 2
    changed = tiny_config(tmp_path, "data.min_chars=1").llm
    assert config_hash(changed, "data") != config_hash(cfg, "data")
    assert not execute(changed, DATA, body).skipped and len(calls) == 3

    # A downstream stage records its input's manifest hash; a rerun upstream invalidates it.
    down = execute(changed, PRETRAIN, lambda f: {})
    manifest = json.loads((Path(down.path) / MANIFEST).read_text())
    assert manifest["inputs"] == {"data": manifest_hash(stage_input(changed, "data").uri)}
    assert execute(changed, PRETRAIN, lambda f: {}).skipped
    execute(changed, DATA, body, force=True)
    assert not execute(changed, PRETRAIN, lambda f: {}).skipped


def test_failed_body_leaves_folder_uncommitted(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path).llm

    def boom(stage_folder: storage.Folder) -> dict:
        folder = stage_folder.local
        (folder / "half.txt").write_text("x")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        execute(cfg, DATA, boom)
    with pytest.raises(StageInputError, match=r"no complete data output.*llmray data"):
        stage_input(cfg, "data")


def test_partial_folder_resumed_only_by_the_same_attempt(tmp_path: Path) -> None:
    """A training stage keeps an interrupted folder to resume from it, but never one started (or
    finished) for another config: that would continue someone else's run."""
    cfg = tiny_config(tmp_path).llm
    seen: list[bool] = []

    def crash(stage_folder: storage.Folder) -> dict:
        folder = stage_folder.local
        (folder / "ckpt").write_text("step 3")
        raise RuntimeError("interrupted")

    def resume(stage_folder: storage.Folder) -> dict:
        folder = stage_folder.local
        seen.append((folder / "ckpt").exists())
        (folder / "ckpt").write_text("step 6")
        return {}

    with pytest.raises(RuntimeError):
        execute(cfg, TRAINING, crash)
    execute(cfg, TRAINING, resume)
    assert seen == [True]  # same config: resumed from the partial folder
    assert not list(Path(cfg.stage_dir("pretrain")).glob("_ATTEMPT*"))  # the marker is not committed

    changed = tiny_config(tmp_path, "pretrain.max_steps=7").llm
    execute(changed, TRAINING, resume)
    assert seen == [True, False]  # a folder committed for another config starts over

    with pytest.raises(RuntimeError):
        execute(cfg, TRAINING, crash)
    execute(changed, TRAINING, resume)
    assert seen == [True, False, False]  # a partial folder of another config starts over too

    with pytest.raises(RuntimeError):
        execute(cfg, TRAINING, crash)
    execute(cfg, TRAINING, resume, force=True)
    assert seen == [True, False, False, False]  # force starts over even from a resumable folder


def _committed(tmp_path: Path, *overrides: str):
    cfg = tiny_config(tmp_path, *overrides).llm
    result = execute(cfg, SOLO, lambda f: (f.local / "weights.bin").write_text("trained") and {})
    return cfg, Path(result.path)


@pytest.mark.parametrize("override", [
    "pretrain.log_every=5", "pretrain.eval_every=7", "pretrain.checkpoint_every=3", "pretrain.max_failures=0",
    "pretrain.keep_checkpoints=3", "pretrain.tensorboard=true", "pretrain.mlflow_uri=file:/tmp/ml",
    "pretrain.sizing.cpus_per_worker=0.5", "pretrain.sizing.placement_strategy=SPREAD",
])
def test_fields_that_change_no_output_do_not_rerun(tmp_path: Path, override: str) -> None:
    _committed(tmp_path)
    again = execute(tiny_config(tmp_path, override).llm, SOLO, lambda f: {"ran": True})
    assert again.skipped and "ran" not in again.metrics


def test_changed_output_field_keeps_the_committed_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = _committed(tmp_path)
    changed = tiny_config(tmp_path, "pretrain.lr.peak=1e-3").llm
    result = execute(changed, SOLO, lambda f: {"ran": True})
    assert not result.skipped and result.kept_aside is not None
    kept = Path(result.kept_aside)
    assert kept.parent == folder.parent and kept.name.startswith("pretrain.")
    assert (kept / "weights.bin").read_text() == "trained" and read_manifest(kept) is not None
    out = capsys.readouterr().out
    assert "changed: pretrain.lr.peak" in out and str(kept) in out
    # --force also keeps the committed folder aside: nothing committed is deleted by a rerun.
    forced = execute(changed, SOLO, lambda f: {}, force=True)
    assert forced.kept_aside and read_manifest(forced.kept_aside) is not None


def test_refuse_names_the_changed_keys_and_force(tmp_path: Path) -> None:
    from llm.errors import StaleOutputError

    _, folder = _committed(tmp_path)
    before = read_manifest(folder)
    changed = tiny_config(tmp_path, "on_change=refuse", "pretrain.lr.peak=1e-3", "pretrain.seed=7").llm
    with pytest.raises(StaleOutputError, match=r"changed: pretrain\.lr\.peak, pretrain\.seed\).*--force"):
        execute(changed, SOLO, lambda f: {})
    after = read_manifest(folder)
    assert before is not None and after is not None and after.created == before.created


def test_checksums_recorded_by_writing_tasks_are_used_and_not_listed(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"defg")
    (tmp_path / CHECKSUMS).mkdir()
    # A writer's record for a.bin (a made-up hash proves it is taken as given), a stale one for b.bin.
    (tmp_path / CHECKSUMS / "task-1.json").write_text(json.dumps({"a.bin": {"size": 3, "sha256": "f" * 64},
                                                                   "b.bin": {"size": 99, "sha256": "0" * 64}}))
    files = write_manifest(tmp_path, "s", "h", {}, {}).files
    assert set(files) == {"a.bin", "b.bin"}
    assert files["a.bin"]["sha256"] == "f" * 64
    assert files["b.bin"]["sha256"] == file_sha256(tmp_path / "b.bin")  # the size disagreed: hashed here
