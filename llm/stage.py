"""The stage contract: skip if done, write only under `<storage>/<run>/<stage>/`, commit with a manifest.

A stage module defines `run(cfg, force=False) -> StageResult` and calls `execute` with a body that
writes into the folder and returns its metrics. Inputs are earlier stages' folders, and only
committed ones (with a whole manifest) are ever read.

With `storage` in an object store (s3://, gs://) the same contract holds through `llm.storage`: the body
gets a driver-local staging folder, uploaded before the manifest; writers on other nodes write to
`target(folder)`, the stage's URI in the store (see `llm.storage` for the rules).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import PipelineConfig
from llm.errors import StageInputError, StaleOutputError
from llm.manifest import (
    CHECKSUMS,
    MANIFEST,
    canonical_hash,
    file_sha256,
    is_done,
    manifest_hash,
    read_manifest,
    write_manifest,
)

# Written when a stage's body starts, removed before the manifest: which config a partial folder is for.
ATTEMPT = "_ATTEMPT.json"


def _read_attempt(folder: str | Path) -> dict[str, Any] | None:
    try:
        value = json.loads(storage.read_bytes(storage.join(folder, ATTEMPT)))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class StageResult:
    """What a stage did: where, whether it was skipped, its metrics, how long it took."""

    stage: str
    path: str
    skipped: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    kept_aside: str | None = None
    """Where an earlier output of this stage was moved before this run (never deleted)."""


def local_dir(uri: str) -> Path:
    """The local folder of a stage, for steps that need one; object-store storage is a one-line error."""
    if storage.is_remote(uri):
        raise StageInputError(f"storage {uri!r}: this step needs a local or shared-filesystem `storage` "
                              "(object stores are not supported here yet)")
    return Path(uri.removeprefix("file://"))


_STAGING: dict[Path, str] = {}
"""Driver-local staging folder -> the stage URI in the object store it is uploaded to."""


def target(folder: Path) -> str:
    """Where writers that may run on any node write the stage's files: the store URI for a staging folder,
    else the folder itself (local or shared storage)."""
    return _STAGING.get(Path(folder), str(folder))


def input_uri(cfg: PipelineConfig, stage: str) -> str:
    """A committed earlier stage's folder as a path or URI (parquet is read from there directly)."""
    uri = cfg.stage_dir(stage)
    if read_manifest(uri) is None:
        raise StageInputError(
            f"{uri}: no complete {stage} output ({MANIFEST} missing or torn); run `llmray {stage}` first"
        )
    return uri


def input_dir(cfg: PipelineConfig, stage: str, parts: tuple[str, ...] | None = None) -> Path:
    """A committed earlier stage's folder on this machine; a clear error when it is missing or incomplete.

    With object-store storage: a local cache copy of its committed files (only those under `parts`, when
    given) and its manifest, each checked against the manifest's size and sha256.
    """
    uri = input_uri(cfg, stage)
    if not storage.is_remote(uri):
        return Path(uri)
    return committed_copy(uri, lambda rel, meta: parts is None or any(
        rel.startswith(f"{p.rstrip('/')}/") or rel == p for p in parts))


def committed_copy(uri: str, select: Callable[[str, dict[str, Any]], bool]) -> Path:
    """A local cache copy of the committed files of a folder in an object store that `select(rel, meta)`
    picks, plus its manifest, each checked against the manifest's size and sha256."""
    blob = storage.read_bytes(storage.join(uri, MANIFEST))
    manifest = read_manifest(uri)
    files = {rel: meta for rel, meta in (manifest.files if manifest else {}).items() if select(rel, meta)}
    files[MANIFEST] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    return storage.cached_copy(uri, files)


def hashed_config(cfg: PipelineConfig, *sections: str) -> dict[str, Any]:
    """The output-changing fields of the config sections a stage depends on (see `Section.NOT_HASHED`)."""
    return {name: getattr(cfg, name).hashed() for name in sections}


def config_hash(cfg: PipelineConfig, *sections: str) -> str:
    """Hash of the output-changing fields of the sections a stage depends on."""
    return canonical_hash(hashed_config(cfg, *sections))


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two hashed configs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def set_aside(folder: str | Path) -> str:
    """Move `folder` to `<name>.<UTC time>` beside it (never delete: it may hold a finished run). On an
    object store every object is copied and checked before the originals are deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = str(folder).rstrip("/")
    aside = f"{base}.{stamp}"
    n = 1
    while storage.exists(aside):
        n += 1
        aside = f"{base}.{stamp}-{n}"
    storage.move_tree(base, aside)
    return aside


def _why_stale(manifest: Any, hashed: dict[str, Any], inputs: dict[str, str], force: bool) -> str:
    if force:
        return "--force"
    keys = changed_keys(manifest.config, hashed) if manifest.config else ["(config of an older llmray)"]
    keys += [f"input {name}" for name in inputs if manifest.inputs.get(name) != inputs[name]]
    return "changed: " + ", ".join(keys or ["inputs"])


def execute(
    cfg: PipelineConfig,
    stage: str,
    body: Callable[[Path], dict[str, Any]],
    *,
    sections: tuple[str, ...],
    inputs: tuple[str, ...] = (),
    force: bool = False,
    keep_partial: bool = False,
    on_set_aside: Callable[[Path, Path], None] | None = None,
    record_only: bool = False,
    object_store: bool = False,
) -> StageResult:
    """Run `body(folder)` unless a matching manifest says it is done, then commit the folder.

    A committed folder for another config (or `force`) is moved aside, never deleted; with
    `cfg.on_change: refuse` the stage stops instead, naming the changed keys. A partial folder is resumed
    when it was started for this very config and these inputs, and otherwise moved aside too.

    Args:
        cfg: the pipeline config.
        stage: the stage's folder name.
        body: writes the stage's outputs into the folder and returns its metrics.
        sections: config sections whose output-changing fields are hashed into the manifest.
        inputs: earlier stages read; their manifest hashes are recorded and compared.
        force: rerun even when the manifest matches, and start over even from a resumable folder.
        keep_partial: resume an uncommitted folder started for the same config and inputs (training).
        on_set_aside: called with (old, new) path when the folder is moved aside, before `body` runs.
        record_only: the folder records a state of the cluster (serve's endpoint), not an artifact; a rerun
            replaces it instead of keeping the old record aside.
        object_store: the body writes through `target(folder)` and reads its inputs from the store, so the
            stage runs with `storage` in an object store; other stages stop there with a one-line error.
    """
    uri = cfg.stage_dir(stage)
    remote = storage.is_remote(uri)
    if remote and not object_store:
        raise StageInputError(f"storage {cfg.storage!r}: the {stage} stage does not run with `storage` in an "
                              "object store yet; use a shared-filesystem `storage` for it")
    input_hashes = {name: manifest_hash(input_uri(cfg, name)) or "" for name in inputs}
    hashed = hashed_config(cfg, *sections)
    digest = canonical_hash(hashed)
    if not force and is_done(uri, digest, input_hashes):
        manifest = read_manifest(uri)
        return StageResult(stage, uri, skipped=True, metrics=manifest.metrics if manifest else {})
    attempt = {"config_hash": digest, "inputs": input_hashes}
    aside: str | None = None
    if record_only and storage.exists(uri):
        storage.remove_tree(uri)
    if storage.exists(uri):
        committed = read_manifest(uri)
        if committed is not None:
            why = _why_stale(committed, hashed, input_hashes, force)
            if cfg.on_change == "refuse" and not force:
                raise StaleOutputError(f"{uri}: committed for another config ({why}); rerun with --force "
                                       "(the committed folder is kept aside) or set on_change: keep")
            aside = set_aside(uri)
            print(f"{stage}: {why}; the committed output was kept at {aside}", flush=True)
        elif not (keep_partial and not force and _read_attempt(uri) == attempt):
            storage.remove_file(storage.join(uri, MANIFEST))  # a torn manifest: no half commit travels along
            aside = set_aside(uri)
            print(f"{stage}: an unfinished run of another config was moved to {aside}", flush=True)
        if aside is not None and on_set_aside is not None and not remote:
            on_set_aside(Path(uri), Path(aside))
    folder = _staging(uri) if remote else Path(uri)
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_text(storage.join(uri, ATTEMPT), json.dumps(attempt, sort_keys=True))
    t0 = time.perf_counter()
    try:
        metrics = body(folder)
        if remote:
            _upload_staged(folder, uri)
    finally:
        _STAGING.pop(folder, None)
    seconds = time.perf_counter() - t0
    metrics = {**metrics, "seconds": round(seconds, 3)}
    storage.remove_file(storage.join(uri, ATTEMPT))
    write_manifest(uri, stage, digest, input_hashes, metrics, config=hashed)
    if remote:
        shutil.rmtree(folder, ignore_errors=True)
    return StageResult(stage, uri, skipped=False, metrics=metrics, seconds=seconds, kept_aside=aside)


def _staging(uri: str) -> Path:
    """A fresh driver-local folder for the stage's driver-written files (the store holds everything else)."""
    folder = storage.cache_dir() / "staging" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _STAGING[folder] = uri
    return folder


def _upload_staged(folder: Path, uri: str) -> None:
    """Upload the staging folder with a checksum sidecar, so the commit does not read them back."""
    sums = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.relative_to(folder).as_posix()
            .startswith(f"{CHECKSUMS}/")}
    if sums:
        (folder / CHECKSUMS).mkdir(exist_ok=True)
        (folder / CHECKSUMS / "_driver.json").write_text(json.dumps(sums, sort_keys=True))
        storage.upload(folder, uri)
