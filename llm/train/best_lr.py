"""`lr: best`: a training stage reads the committed sweep's `best.json` (written by `llm.tune.best`).

The schedule is stored with its warmup as a fraction of the trial's steps, so the stage that uses it
warms up over the same share of its own (longer) run; kind, peak and floor carry over as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from llm import storage
from llm.config import LLM_PREFIX, PipelineConfig, ScheduleConfig
from llm.errors import ConfigError, LLMRayError, StageInputError
from llm.manifest import manifest_hash
from llm.stage import stage_input

BEST = "best.json"


def read_best(cfg: PipelineConfig, stage: str) -> tuple[dict[str, Any], storage.Folder]:
    """The committed sweep's `best.json` for `stage` and the sweep's folder, or a one-line error naming the
    key to fix."""
    key = f"{LLM_PREFIX}.{stage}.lr"
    try:
        folder = stage_input(cfg, "sweep")
    except StageInputError as e:
        raise StageInputError(f"{key}: best: {e}") from None
    try:
        best = json.loads(folder.read_text(BEST))
    except (OSError, ValueError) as e:
        raise StageInputError(f"{key}: best: {folder.path(BEST)} is unreadable ({e}); rerun `llmray sweep --force`") \
            from None
    if best.get("target") != stage:
        raise ConfigError(f"{key}: best: the committed sweep ({folder.uri}) tuned {best.get('target')}, not {stage}; "
                          f"set sweep.target={stage} and run `llmray sweep`")
    return best, folder


def resolve_lr(cfg: PipelineConfig, stage: str) -> ScheduleConfig:
    """The schedule `<stage>.lr: best` stands for: the sweep's winner, warmup scaled to the stage's steps.

    Args:
        cfg: the pipeline config (its committed `sweep/` folder is read).
        stage: `pretrain` or `finetune`; must be the sweep's `target`.
    """
    best, _ = read_best(cfg, stage)
    return _schedule(best, int(getattr(cfg, stage).max_steps))


def _schedule(best: dict[str, Any], steps: int) -> ScheduleConfig:
    sched = dict(best["schedule"])
    sched["warmup_steps"] = int(round(float(best["warmup_fraction"]) * steps))
    return ScheduleConfig.model_validate(sched)


def apply_best(cfg: PipelineConfig, stage: str) -> tuple[PipelineConfig, dict[str, Any] | None]:
    """`cfg` with `<stage>.lr: best` replaced by the sweep's schedule, and where it came from (for the
    stage's manifest and console); `cfg` itself and `None` when the stage names its own schedule."""
    section = getattr(cfg, stage)
    if section.lr != "best":
        return cfg, None
    best, folder = read_best(cfg, stage)
    schedule = _schedule(best, int(section.max_steps))
    source = {"sweep": folder.uri, "sweep_manifest": manifest_hash(folder.uri), "trial_id": best["trial_id"],
              "trial_final_val_loss": best.get("final_val_loss"), "schedule": schedule.model_dump(mode="json")}
    return cfg.model_copy(update={stage: section.model_copy(update={"lr": schedule})}), source


def describe(source: dict[str, Any]) -> str:
    """One console line: which sweep trial the schedule came from."""
    s = source["schedule"]
    return (f"lr: best from {source['sweep']} (trial {source['trial_id']}, sweep manifest "
            f"{str(source['sweep_manifest'])[:12]}): {s['kind']} peak {s['peak']:.2e}, warmup {s['warmup_steps']}, "
            f"floor {s['floor']:g}")


def with_best(stage: str) -> Callable[[PipelineConfig], PipelineConfig]:
    """For `llmray status`: the config as `stage` hashes it, `lr: best` standing for the sweep's winning
    schedule (no usable sweep: as written, and the stage reads as stale)."""

    def as_run(cfg: PipelineConfig) -> PipelineConfig:
        if getattr(cfg, stage).lr != "best":
            return cfg
        try:
            return apply_best(cfg, stage)[0]
        except LLMRayError:
            return cfg

    return as_run
