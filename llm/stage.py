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
from llm.errors import StageInputError
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


def config_hash(cfg: PipelineConfig, *sections: str) -> str:
    """Hash of the config sections a stage depends on (its own and any it reads)."""
    return canonical_hash({name: getattr(cfg, name).model_dump(mode="json") for name in sections})


def execute(
    cfg: PipelineConfig,
    stage: str,
    body: Callable[[Path], dict[str, Any]],
    *,
    sections: tuple[str, ...],
    inputs: tuple[str, ...] = (),
    force: bool = False,
    keep_partial: bool = False,
) -> StageResult:
    """Run `body(folder)` unless a matching manifest says it is done, then commit the folder.

    Args:
        cfg: the pipeline config.
        stage: the stage's folder name.
        body: writes the stage's outputs into the folder and returns its metrics.
        sections: config sections whose values change the outputs (hashed into the manifest).
        inputs: earlier stages read; their manifest hashes are recorded and compared.
        force: rerun even when the manifest matches, and start over even from a resumable folder.
        keep_partial: keep an uncommitted folder's contents when it was started for the same config
            and inputs (a training stage resumes from them); otherwise the folder is cleared first.
    """
    folder = local_dir(cfg.stage_dir(stage))
    input_hashes = {name: manifest_hash(input_dir(cfg, name)) or "" for name in inputs}
    digest = config_hash(cfg, *sections)
    if not force and is_done(folder, digest, input_hashes):
        manifest = read_manifest(folder)
        return StageResult(stage, str(folder), skipped=True, metrics=manifest.metrics if manifest else {})
    attempt = {"config_hash": digest, "inputs": input_hashes}
    if folder.exists():
        # A partial folder is resumed only when it was started for this very config and these inputs;
        # a committed folder for another config, or a partial one of another attempt, starts over.
        resumable = (keep_partial and not force and not (folder / MANIFEST).exists()
                     and _read_attempt(folder) == attempt)
        (folder / MANIFEST).unlink(missing_ok=True)  # uncommit first: a crash below leaves it incomplete
        if not resumable:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ATTEMPT).write_text(json.dumps(attempt, sort_keys=True))
    t0 = time.perf_counter()
    metrics = body(folder)
    seconds = time.perf_counter() - t0
    metrics = {**metrics, "seconds": round(seconds, 3)}
    (folder / ATTEMPT).unlink(missing_ok=True)
    write_manifest(folder, stage, digest, input_hashes, metrics)
    return StageResult(stage, str(folder), skipped=False, metrics=metrics, seconds=seconds)
