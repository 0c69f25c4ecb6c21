"""Learning-rate schedules shared by every training stage (pretrain, finetune, sweep trials, distillation).

Each schedule is a pure function of the optimizer step, so resuming restores it exactly by restoring the
step: there is no scheduler state to save or to get out of sync with the checkpoint.
"""

from __future__ import annotations

import math

from llm.config import ScheduleConfig


def lr_at(step: int, total_steps: int, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Args:
        step: the step about to be taken, 0-based.
        total_steps: the run's total optimizer steps (`max_steps`).
        sched: the schedule's kind, peak, warmup, floor and (wsd) decay fraction.

    Returns:
        The learning rate. Warmup is linear from `peak / warmup` at step 0 to `peak` at the end of warmup,
        so the first step already moves the weights.
    """
    peak, warmup = sched.peak, sched.warmup_steps
    floor = peak * sched.floor
    if step < warmup:
        return peak * (step + 1) / warmup
    if sched.kind == "constant":
        return peak
    if sched.kind == "inverse_sqrt":
        # Continuous at the end of warmup: peak * sqrt(warmup / step); never below the floor.
        return max(floor, peak * math.sqrt(max(1, warmup) / max(1, step + 1)))
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if sched.kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if sched.kind == "linear":
        return peak - (peak - floor) * progress
    if sched.kind == "wsd":
        # Warmup-stable-decay (Hu et al. 2024): hold the peak, then decay linearly over the last fraction.
        decay_start = total_steps - max(1, int(round(sched.decay_fraction * total_steps)))
        if step < max(warmup, decay_start):
            return peak
        span = max(1, total_steps - max(warmup, decay_start))
        return peak - (peak - floor) * min(1.0, (step - max(warmup, decay_start)) / span)
    raise ValueError(f"unknown schedule kind {sched.kind!r}")

