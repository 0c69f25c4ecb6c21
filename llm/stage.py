"""The stage contract: skip if done, write only under `<storage>/<run>/<stage>/`, commit with a manifest.

A stage module defines `run(cfg, force=False) -> StageResult` and calls `execute` with a body that
writes into the folder and returns its metrics. Inputs are earlier stages' folders, and only
committed ones (with a whole manifest) are ever read.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.config import PipelineConfig
from llm.errors import StageInputError, StaleOutputError
from llm.manifest import MANIFEST, canonical_hash, is_done, manifest_hash, read_manifest, write_manifest

# Written when a stage's body starts, removed before the manifest: which config a partial folder is for.
ATTEMPT = "_ATTEMPT.json"


def _read_attempt(folder: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((folder / ATTEMPT).read_text())
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
    """The local folder of a stage. Remote storage (s3://, gs://) is reached by the stages through
    pyarrow/Ray filesystems; the contract's bookkeeping needs a local path today."""
    if "://" in uri and not uri.startswith("file://"):
        raise StageInputError(f"storage {uri!r}: remote storage is written by Ray's writers; this step "
                              "needs a local or shared-filesystem path")
    return Path(uri.removeprefix("file://"))


def input_dir(cfg: PipelineConfig, stage: str) -> Path:
    """A committed earlier stage's folder; a clear error when it is missing or incomplete."""
    folder = local_dir(cfg.stage_dir(stage))
    if read_manifest(folder) is None:
        raise StageInputError(
            f"{folder}: no complete {stage} output ({MANIFEST} missing or torn); run `llmray {stage}` first"
        )
    return folder


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


def set_aside(folder: Path) -> Path:
    """Rename `folder` to `<name>.<UTC time>` beside it (never delete: it may hold a finished run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = folder.with_name(f"{folder.name}.{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.{stamp}-{n}")
    folder.rename(aside)
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
    """
    folder = local_dir(cfg.stage_dir(stage))
    input_hashes = {name: manifest_hash(input_dir(cfg, name)) or "" for name in inputs}
    hashed = hashed_config(cfg, *sections)
    digest = canonical_hash(hashed)
    if not force and is_done(folder, digest, input_hashes):
        manifest = read_manifest(folder)
        return StageResult(stage, str(folder), skipped=True, metrics=manifest.metrics if manifest else {})
    attempt = {"config_hash": digest, "inputs": input_hashes}
    aside: Path | None = None
    if folder.exists() and record_only:
        shutil.rmtree(folder)
    if folder.exists():
        committed = read_manifest(folder)
        if committed is not None:
            why = _why_stale(committed, hashed, input_hashes, force)
            if cfg.on_change == "refuse" and not force:
                raise StaleOutputError(f"{folder}: committed for another config ({why}); rerun with --force "
                                       "(the committed folder is kept aside) or set on_change: keep")
            aside = set_aside(folder)
            print(f"{stage}: {why}; the committed output was kept at {aside}", flush=True)
        elif not (keep_partial and not force and _read_attempt(folder) == attempt):
            (folder / MANIFEST).unlink(missing_ok=True)  # a torn manifest: no half commit travels along
            aside = set_aside(folder)
            print(f"{stage}: an unfinished run of another config was moved to {aside}", flush=True)
        if aside is not None and on_set_aside is not None:
            on_set_aside(folder, aside)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ATTEMPT).write_text(json.dumps(attempt, sort_keys=True))
    t0 = time.perf_counter()
    metrics = body(folder)
    seconds = time.perf_counter() - t0
    metrics = {**metrics, "seconds": round(seconds, 3)}
    (folder / ATTEMPT).unlink(missing_ok=True)
    write_manifest(folder, stage, digest, input_hashes, metrics, config=hashed)
    return StageResult(stage, str(folder), skipped=False, metrics=metrics, seconds=seconds,
                       kept_aside=str(aside) if aside else None)
