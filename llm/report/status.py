"""`llmray status`: each stage of a run is done, stale, partial (resumable from a step) or not started."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm import storage
from llm.config import PipelineConfig
from llm.errors import StorageError
from llm.manifest import read_manifest
from llm.stage import Stage, changed_since
from llm.stages import STAGES

# The figure shown for a finished stage, first one present wins.
KEY_METRICS = ("val_ppl", "final_loss", "best_val_loss", "chosen", "documents_out", "url")


@dataclass
class StageStatus:
    """One row of `llmray status`."""

    stage: str
    enabled: bool
    state: str
    """done | stale | partial | unreadable | not started"""
    folder: str
    detail: str


def stage_status(cfg: PipelineConfig, stage: Stage) -> StageStatus:
    """The state of one stage's folder against the current config and inputs."""
    folder = cfg.stage_dir(stage.name)  # a path or an object-store URI
    enabled = stage.enabled(cfg)
    try:
        return _stage_status(cfg, stage, folder, enabled)
    except StorageError as e:  # shown, not raised: status must describe a damaged run, not stop on it
        return StageStatus(stage.name, enabled, "unreadable", folder, str(e))


def _stage_status(cfg: PipelineConfig, stage: Stage, folder: str, enabled: bool) -> StageStatus:
    manifest = read_manifest(folder)
    if manifest is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest.created))
        changed = changed_since(cfg, manifest, stage.as_run(cfg) if stage.as_run is not None else None)
        if changed:
            return StageStatus(stage.name, enabled, "stale", folder, f"{when}; changed since: {', '.join(changed)}")
        return StageStatus(stage.name, enabled, "done", folder, f"{when}; {key_metric(manifest.metrics)}")
    if storage.exists(folder):
        detail = stage.progress(folder) if stage.progress is not None else "a rerun starts it over"
        return StageStatus(stage.name, enabled, "partial", folder, detail)
    return StageStatus(stage.name, enabled, "not started", folder, "")


def key_metric(metrics: dict[str, Any], name: Callable[[str], str] = str) -> str:
    """A finished stage's one figure (the first of `KEY_METRICS` present), its key shown through `name`."""
    for key in KEY_METRICS:
        value = metrics.get(key)
        if value is not None:
            return f"{name(key)} {value:,.4g}" if isinstance(value, float) else f"{name(key)} {value}"
    return f"{metrics.get('seconds', 0):.0f}s"


def run_status(cfg: PipelineConfig) -> list[StageStatus]:
    """Every stage, in pipeline order."""
    return [stage_status(cfg, stage) for stage in STAGES]


def format_status(rows: list[StageStatus]) -> str:
    """The table `llmray status` prints."""
    lines = [f"{'stage':<9} {'state':<12} detail"]
    for r in rows:
        state = r.state if r.enabled or r.state != "not started" else "disabled"
        lines.append(f"{r.stage:<9} {state:<12} {r.detail}".rstrip())
        if r.state != "not started":
            lines.append(f"{'':<22}{r.folder}")
    return "\n".join(lines)
