"""`sweep/best.json`: the winning schedule, as the sweep writes it (a training stage with `lr: best` reads it
through `llm.train.best_lr`, below this package).

The schedule is stored with its warmup as a fraction of the trial's steps, so the stage that uses it
warms up over the same share of its own (longer) run; kind, peak and floor carry over as they are.
"""

from __future__ import annotations

from typing import Any

from llm.config import ScheduleConfig
from llm.tune.results import TrialRow


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
