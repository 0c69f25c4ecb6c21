"""`llmray status`: each stage of a run is done, stale, partial (resumable from a step) or not started."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llm import storage
from llm.config import STAGE_SECTIONS, PipelineConfig
from llm.errors import LLMRayError
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
        ran = _as_run(cfg, stage)
        changed = changed_keys(manifest.config, hashed_config(ran, *manifest.config)) if manifest.config else []
        changed += [f"input {name}" for name, h in manifest.inputs.items()
                    if manifest_hash(cfg.stage_dir(name)) != h]
        if changed:
            return StageStatus(stage, enabled, "stale", str(folder), f"{when}; changed since: {', '.join(changed)}")
        return StageStatus(stage, enabled, "done", str(folder), f"{when}; {_key_metric(manifest.metrics)}")
    if storage.exists(folder):
        return StageStatus(stage, enabled, "partial", str(folder), _partial_detail(stage, folder))
    return StageStatus(stage, enabled, "not started", str(folder), "")


def _as_run(cfg: PipelineConfig, stage: str) -> PipelineConfig:
    """The config as the stage hashes it when it runs: the sweep hashes its trials' setup of the target
    section, and `lr: best` stands for the sweep's winning schedule; comparing the config as written
    would call both stale on every run."""
    if stage == "sweep":
        from llm.tune.stage import trial_config  # imports Ray Tune: only for a committed sweep

        return trial_config(cfg)
    if stage in ("pretrain", "finetune") and getattr(cfg, stage).lr == "best":
        from llm.tune.best import apply_best

        try:
            return apply_best(cfg, stage)[0]
        except LLMRayError:  # no usable sweep: the schedule is unknown, and the stage reads as stale
            return cfg
    return cfg


def _key_metric(metrics: dict[str, Any]) -> str:
    for key in KEY_METRICS:
        value = metrics.get(key)
        if value is not None:
            return f"{key} {value:,.4g}" if isinstance(value, float) else f"{key} {value}"
    return f"{metrics.get('seconds', 0):.0f}s"


def _partial_detail(stage: str, folder: str) -> str:
    """What a rerun of an interrupted stage keeps: each stage resumes from its own kind of record."""
    if stage == "sweep":
        return _sweep_progress(folder)
    if stage == "compress":
        return _variants_done(folder)
    return _resumable(folder)


def _resumable(folder: str) -> str:
    from llm.train import checkpoint as ckpt

    choice = ckpt.choose(storage.join(folder, "ray"), checksums=False)
    if choice.path:
        return f"resumable from step {choice.step}"
    return "interrupted before its first checkpoint; a rerun starts it over"


def _sweep_progress(folder: str) -> str:
    """Trials started (each writes `trials/<id>/trial.json` first); whether Tune saved the experiment a
    rerun restores (`tune/tuner.pkl`, what `Tuner.can_restore` looks for), else the sweep starts over."""
    from llm.tune.trial import TRIALS_DIR

    started = sum(1 for rel in storage.list_files(storage.join(folder, TRIALS_DIR)) if _is_top(rel, "trial.json"))
    if storage.size(storage.join(folder, "tune", "tuner.pkl")) is None:
        return f"{started} trials started; Tune saved no experiment yet, a rerun starts the sweep over"
    return f"{started} trials started; a rerun continues the sweep (ended trials are kept)"


def _variants_done(folder: str) -> str:
    """Variants finished and checked (`<variant>/.done`; intermediates under `_work/` are not listed)."""
    from llm.compress.variants import DONE

    done = sorted(rel.split("/")[0] for rel in storage.list_files(folder) if _is_top(rel, DONE))
    if not done:
        return "no variant done yet; a rerun builds every variant"
    return f"variants done: {', '.join(done)}; a rerun keeps them"


def _is_top(rel: str, name: str) -> bool:
    """`rel` is `<one folder>/<name>`: a record of one trial or variant, not a file deeper inside one."""
    parts = rel.split("/")
    return len(parts) == 2 and parts[1] == name


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
