"""`sweep/best.json`: the winning schedule, and how a training stage with `lr: best` reads it.

The schedule is stored with its warmup as a fraction of the trial's steps, so the stage that uses it
warms up over the same share of its own (longer) run; kind, peak and floor carry over as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import LLM_PREFIX, PipelineConfig, ScheduleConfig
from llm.errors import ConfigError, LLMRayError, StageInputError
from llm.tune.results import TrialRow

BEST = "best.json"


def best_record(best: TrialRow, target: str, max_steps: int, trials: int) -> dict[str, Any]:
    """What `best.json` holds."""
    schedule = ScheduleConfig(kind=best.kind, peak=best.peak, warmup_steps=best.warmup_steps, floor=best.floor)
    record: dict[str, Any] = {
        "target": target, "trial_id": best.trial_id, "schedule": schedule.model_dump(mode="json"),
        "warmup_fraction": best.warmup_fraction, "trial_max_steps": max_steps,
        "final_val_loss": best.final_val_loss, "best_val_loss": best.best_val_loss, "trials": trials,
    }
    for name in ("weight_decay", "micro_batch_size"):
        if getattr(best, name) is not None:
            record[name] = getattr(best, name)
    return record


def read_best(cfg: PipelineConfig, stage: str) -> tuple[dict[str, Any], Path]:
    """The committed sweep's `best.json` for `stage`, or a one-line error naming the key to fix. With the
    sweep in an object store, the folder returned is a local cache copy of its `best.json` and manifest,
    checked against the manifest."""
    from llm.stage import input_dir

    key = f"{LLM_PREFIX}.{stage}.lr"
    try:
        folder = input_dir(cfg, "sweep", parts=(BEST,))
    except StageInputError as e:
        raise StageInputError(f"{key}: best: {e}") from None
    try:
        best = json.loads((folder / BEST).read_text())
    except (OSError, ValueError) as e:
        raise StageInputError(f"{key}: best: {folder / BEST} is unreadable ({e}); rerun `llmray sweep --force`") \
            from None
    if best.get("target") != stage:
        raise ConfigError(f"{key}: best: the committed sweep ({folder}) tuned {best.get('target')}, not {stage}; "
                          f"set sweep.target={stage} and run `llmray sweep`")
    return best, folder


def resolve_lr(cfg: PipelineConfig, stage: str) -> ScheduleConfig:
    """The schedule `<stage>.lr: best` stands for: the sweep's winner, warmup scaled to the stage's steps.

    Args:
        cfg: the pipeline config (its committed `sweep/` folder is read).
        stage: `pretrain` or `finetune`; must be the sweep's `target`.
    """
    best, _ = read_best(cfg, stage)
    steps = int(getattr(cfg, stage).max_steps)
    sched = dict(best["schedule"])
    sched["warmup_steps"] = int(round(float(best["warmup_fraction"]) * steps))
    return ScheduleConfig.model_validate(sched)


def apply_best(cfg: PipelineConfig, stage: str) -> tuple[PipelineConfig, dict[str, Any] | None]:
    """`cfg` with `<stage>.lr: best` replaced by the sweep's schedule, and where it came from (for the
    stage's manifest and console); `cfg` itself and `None` when the stage names its own schedule."""
    from llm.manifest import manifest_hash

    section = getattr(cfg, stage)
    if section.lr != "best":
        return cfg, None
    schedule = resolve_lr(cfg, stage)
    best, folder = read_best(cfg, stage)
    where = cfg.stage_dir("sweep") if storage.is_remote(cfg.stage_dir("sweep")) else str(folder)  # not the cache
    source = {"sweep": where, "sweep_manifest": manifest_hash(folder), "trial_id": best["trial_id"],
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
