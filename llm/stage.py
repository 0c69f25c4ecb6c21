"""The stage contract: skip if done, write only under `<storage>/<run>/<stage>/`, commit with a manifest.

A stage module declares `STAGE = Stage(...)` and defines `run(cfg, force=False) -> StageResult`, which
calls `execute(cfg, STAGE, body)` with a body that writes into its folder and returns its metrics. Inputs
are earlier stages' folders (`stage_input`), and only committed ones (with a whole manifest) are ever read.

The body gets one `storage.Folder`: writers on any node write to `folder.uri` / `folder.path(...)`, this
process writes its own files under `folder.local` (with `storage` in an object store, a driver-local
staging folder uploaded before the manifest), inputs a library needs on disk come from `fetch`.
"""

from __future__ import annotations

import hashlib
import json
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
    Manifest,
    canonical_hash,
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


@dataclass(frozen=True)
class Stage:
    """A stage, declared once, at the bottom of its own module; `llm.stages` lists them in pipeline order and
    the CLI verbs, `llmray run`, `jobs/`, status and the report derive from that list."""

    name: str
    """The CLI verb, the folder under `<storage>/<run>/` and the config section that enables it."""
    what: str
    """What it does, for its header line and the CLI help."""
    run: Callable[..., StageResult]
    """`run(cfg, force=False) -> StageResult`."""
    sections: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]]
    """Config sections whose output-changing fields are hashed into its manifest (a function of the config
    when they depend on it: the sweep hashes the section of the stage it sweeps for)."""
    inputs: tuple[str, ...] = ()
    """Earlier stages it may read (their manifest hashes are recorded and compared)."""
    resumable: bool = False
    """An uncommitted folder started for the same config and inputs is resumed (training)."""
    record_only: bool = False
    """The folder records a state of the cluster (serve's endpoint), not an artifact: a rerun replaces it."""
    foreground: bool = False
    """It may hold the foreground until Ctrl-C (serve): `llmray run` writes the report before it starts."""
    as_run: Callable[[PipelineConfig], PipelineConfig] | None = None
    """The config as the stage hashes it when it runs, for `llmray status` (the sweep hashes its trials'
    setup; `lr: best` stands for the winning schedule); None: as written."""
    progress: Callable[[str], str] | None = None
    """What a rerun of an interrupted run of it keeps, from its folder, for `llmray status`."""

    def enabled(self, cfg: PipelineConfig) -> bool:
        return bool(getattr(cfg, self.name).enabled)

    def hashed_sections(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return self.sections(cfg) if callable(self.sections) else self.sections


def stage_input(cfg: PipelineConfig, stage: str) -> storage.Folder:
    """A committed earlier stage's folder (read-only), whose `fetch` copies are checked against its manifest;
    a one-line error when it is missing or incomplete."""
    uri = cfg.stage_dir(stage)
    manifest = read_manifest(uri)
    if manifest is None:
        raise StageInputError(
            f"{uri}: no complete {stage} output ({MANIFEST} missing or torn); run `llmray {stage}` first"
        )
    return committed_folder(uri, manifest)


def committed_folder(uri: str, manifest: Manifest | None = None) -> storage.Folder:
    """A committed folder whose `fetch` copies are checked against its manifest (the manifest included)."""
    manifest = manifest or read_manifest(uri)
    files = dict(manifest.files) if manifest else {}
    try:
        blob = storage.read_bytes(storage.join(uri, MANIFEST))
        files[MANIFEST] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    except FileNotFoundError:
        pass
    return storage.Folder(uri, files=files)


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


def execute(cfg: PipelineConfig, stage: Stage, body: Callable[[storage.Folder], dict[str, Any]], *,
            force: bool = False, inputs: tuple[str, ...] | None = None,
            on_set_aside: Callable[[Path, Path], None] | None = None) -> StageResult:
    """Run `body(folder)` unless a matching manifest says it is done, then commit the folder.

    A committed folder for another config (or `force`) is moved aside, never deleted; with
    `cfg.on_change: refuse` the stage stops instead, naming the changed keys. A partial folder is resumed
    when the stage is `resumable` and it was started for this very config and these inputs, and otherwise
    moved aside too.

    Args:
        cfg: the pipeline config.
        stage: the stage's declaration (its folder name, hashed sections, inputs, resume rule).
        body: writes the stage's outputs into the folder and returns its metrics.
        force: rerun even when the manifest matches, and start over even from a resumable folder.
        inputs: the earlier stages this run reads (default: all of `stage.inputs`).
        on_set_aside: called with (old, new) path when a folder on disk is moved aside, before `body` runs.
    """
    uri = cfg.stage_dir(stage.name)
    inputs = stage.inputs if inputs is None else inputs
    input_hashes = {name: manifest_hash(stage_input(cfg, name).uri) or "" for name in inputs}
    hashed = hashed_config(cfg, *stage.hashed_sections(cfg))
    digest = canonical_hash(hashed)
    if not force and is_done(uri, digest, input_hashes):
        manifest = read_manifest(uri)
        return StageResult(stage.name, uri, skipped=True, metrics=manifest.metrics if manifest else {})
    attempt = {"config_hash": digest, "inputs": input_hashes}
    aside = _clear(cfg, stage, uri, attempt, hashed, force)
    folder = storage.open_for_writing(uri)
    if aside is not None and on_set_aside is not None and folder.on_disk:
        on_set_aside(Path(uri), Path(aside))
    storage.write_text(storage.join(uri, ATTEMPT), json.dumps(attempt, sort_keys=True))
    t0 = time.perf_counter()
    metrics = body(folder)
    folder.flush(f"{CHECKSUMS}/_driver.json")  # the staged files, with their checksums (the commit trusts them)
    seconds = time.perf_counter() - t0
    metrics = {**metrics, "seconds": round(seconds, 3)}
    storage.remove_file(storage.join(uri, ATTEMPT))
    write_manifest(uri, stage.name, digest, input_hashes, metrics, config=hashed)
    folder.close()
    return StageResult(stage.name, uri, skipped=False, metrics=metrics, seconds=seconds, kept_aside=aside)


def _clear(cfg: PipelineConfig, stage: Stage, uri: str, attempt: dict[str, Any], hashed: dict[str, Any],
           force: bool) -> str | None:
    """Make room for a run: keep a committed or foreign partial folder aside (returns where), or leave a
    partial folder of this very attempt in place to be resumed."""
    if stage.record_only and storage.exists(uri):
        storage.remove_tree(uri)
    if not storage.exists(uri):
        return None
    committed = read_manifest(uri)
    if committed is not None:
        why = _why_stale(committed, hashed, attempt["inputs"], force)
        if cfg.on_change == "refuse" and not force:
            raise StaleOutputError(f"{uri}: committed for another config ({why}); rerun with --force "
                                   "(the committed folder is kept aside) or set on_change: keep")
        aside = set_aside(uri)
        print(f"{stage.name}: {why}; the committed output was kept at {aside}", flush=True)
        return aside
    if stage.resumable and not force and _read_attempt(uri) == attempt:
        return None
    storage.remove_file(storage.join(uri, MANIFEST))  # a torn manifest: no half commit travels along
    aside = set_aside(uri)
    print(f"{stage.name}: an unfinished run of another config was moved to {aside}", flush=True)
    return aside
