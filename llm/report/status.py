"""`llmray status`: each stage of a run is done, stale, partial (resumable from a step) or not started."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llm import storage
from llm.config import STAGE_SECTIONS, PipelineConfig
from llm.manifest import manifest_hash, read_manifest
from llm.stage import changed_keys, hashed_config

# The figure shown for a finished stage, first one present wins.
KEY_METRICS = ("val_ppl", "final_loss", "best_val_loss", "chosen", "documents_out", "url")


@dataclass
class StageStatus:
    """One row of `llmray status`."""

    stage: str
    enabled: bool
    state: str
    """done | stale | partial | not started"""
    folder: str
    detail: str


def stage_status(cfg: PipelineConfig, stage: str) -> StageStatus:
    """The state of one stage's folder against the current config and inputs."""
    folder = cfg.stage_dir(stage)  # a path or an object-store URI
    enabled = bool(getattr(cfg, stage).enabled)
    manifest = read_manifest(folder)
    if manifest is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest.created))
        changed = changed_keys(manifest.config, hashed_config(cfg, *manifest.config)) if manifest.config else []
        changed += [f"input {name}" for name, h in manifest.inputs.items()
                    if manifest_hash(cfg.stage_dir(name)) != h]
        if changed:
            return StageStatus(stage, enabled, "stale", str(folder), f"{when}; changed since: {', '.join(changed)}")
        return StageStatus(stage, enabled, "done", str(folder), f"{when}; {_key_metric(manifest.metrics)}")
    if storage.exists(folder):
        return StageStatus(stage, enabled, "partial", str(folder), _resumable(folder))
    return StageStatus(stage, enabled, "not started", str(folder), "")


def _key_metric(metrics: dict[str, Any]) -> str:
    for key in KEY_METRICS:
        value = metrics.get(key)
        if value is not None:
            return f"{key} {value:,.4g}" if isinstance(value, float) else f"{key} {value}"
    return f"{metrics.get('seconds', 0):.0f}s"


def _resumable(folder: str) -> str:
    from llm.train import checkpoint as ckpt

    choice = ckpt.choose(storage.join(folder, "ray"), checksums=False)
    if choice.path:
        return f"resumable from step {choice.step}"
    return "interrupted before its first checkpoint; a rerun starts it over"


def run_status(cfg: PipelineConfig) -> list[StageStatus]:
    """Every stage section, in pipeline order."""
    return [stage_status(cfg, stage) for stage in STAGE_SECTIONS]


def format_status(rows: list[StageStatus]) -> str:
    """The table `llmray status` prints."""
    lines = [f"{'stage':<9} {'state':<12} detail"]
    for r in rows:
        state = r.state if r.enabled or r.state != "not started" else "disabled"
        lines.append(f"{r.stage:<9} {state:<12} {r.detail}".rstrip())
        if r.state != "not started":
            lines.append(f"{'':<22}{r.folder}")
    return "\n".join(lines)
