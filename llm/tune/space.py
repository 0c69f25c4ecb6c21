"""From the typed `sweep` section to Ray Tune's objects: the search space, the searcher, the scheduler,
and back from a trial's sampled values to the target stage's `TrainConfig` fields."""

from __future__ import annotations

import math
from typing import Any

from llm.config import ScheduleConfig, SweepConfig
from llm.tune.asha import resumable_asha

METRIC, MODE, TIME_ATTR = "val_loss", "min", "step"


def _range(low: float, high: float, log: bool = False) -> Any:
    from ray import tune

    if low == high:  # a fixed value: not a dimension of the search
        return low
    return tune.loguniform(low, high) if log else tune.uniform(low, high)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's `param_space`: one entry per swept field (grid search: kinds x log-spaced peaks)."""
    from ray import tune

    space = sweep.space
    out: dict[str, Any]
    if sweep.search == "grid":
        lo, hi = space.peak
        n = sweep.grid_peaks
        peaks = sorted({lo * (hi / lo) ** (i / (n - 1)) if n > 1 else math.sqrt(lo * hi) for i in range(n)})
        out = {"kind": tune.grid_search(list(space.kind)), "peak": tune.grid_search(peaks),
               "warmup_fraction": sum(space.warmup_fraction) / 2, "floor": sum(space.floor) / 2}
        for name in ("weight_decay", "micro_batch_size"):
            values = getattr(space, name)
            if values is not None:
                out[name] = tune.grid_search(list(values))
        return out
    out = {"kind": tune.choice(list(space.kind)) if len(space.kind) > 1 else space.kind[0],
           "peak": _range(*space.peak, log=True),
           "warmup_fraction": _range(*space.warmup_fraction),
           "floor": _range(*space.floor)}
    for name in ("weight_decay", "micro_batch_size"):
        values = getattr(space, name)
        if values is not None:
            out[name] = tune.choice(list(values)) if len(values) > 1 else values[0]
    return out


def planned_trials(sweep: SweepConfig) -> int:
    """How many trials the sweep runs in all."""
    if sweep.search != "grid":
        return sweep.num_trials
    n = len(sweep.space.kind) * sweep.grid_peaks
    for values in (sweep.space.weight_decay, sweep.space.micro_batch_size):
        n *= len(values) if values else 1
    return n


def searcher(sweep: SweepConfig, concurrent: int) -> Any:
    """Seeded, so the same config draws the same trials (what makes ASHA-vs-full comparisons fair), and
    capped at `concurrent` running trials (Tune ignores `TuneConfig.max_concurrent_trials` for its
    variant generator, so the cap is set on the searcher itself)."""
    if sweep.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna_search = OptunaSearch(metric=METRIC, mode=MODE, sampler=optuna.samplers.TPESampler(seed=sweep.seed))
        return ConcurrencyLimiter(optuna_search, max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent)


def scheduler(sweep: SweepConfig, trials_dir: str) -> Any:
    """ASHA on the explicit `step` each report carries (not Tune's report count, which depends on cadence),
    keeping its rungs across an interruption (see `llm.tune.asha`)."""
    from ray.tune.schedulers import FIFOScheduler

    if sweep.scheduler == "none":
        return FIFOScheduler()
    return resumable_asha(trials_dir, time_attr=TIME_ATTR, max_t=sweep.max_steps,
                         grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)


def schedule_of(values: dict[str, Any], max_steps: int) -> ScheduleConfig:
    """The `ScheduleConfig` of a trial's sampled values for a run of `max_steps` steps."""
    return ScheduleConfig(kind=values["kind"], peak=float(values["peak"]), floor=float(values["floor"]),
                          warmup_steps=int(round(float(values["warmup_fraction"]) * max_steps)))


def train_overrides(values: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """`TrainConfig` fields a trial's values set: the schedule, and weight decay / micro batch if swept."""
    out: dict[str, Any] = {"lr": schedule_of(values, max_steps).model_dump(mode="json")}
    for name in ("weight_decay", "micro_batch_size"):
        if name in values:
            out[name] = values[name]
    return out
