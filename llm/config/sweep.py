"""The sweep section: Ray Tune over learning-rate schedules of a target training stage."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from llm.config.base import Section
from llm.config.train import SizingOverride

Kind = Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt"]
ALL_KINDS: list[Kind] = ["cosine", "linear", "constant", "wsd", "inverse_sqrt"]


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if low > high:
        raise ValueError(f"range must be [low, high] with low <= high (got [{low:g}, {high:g}])")
    return value


class SpaceConfig(Section):
    """What a trial's schedule is drawn from. A range `[a, a]` fixes the value."""

    kind: list[Kind] = Field(default_factory=lambda: list(ALL_KINDS), min_length=1)
    """Schedule kinds to try (a categorical choice; grid search tries each)."""
    peak: tuple[float, float] = (1e-4, 1e-2)
    """Peak learning rate, sampled log-uniformly in [low, high]."""
    warmup_fraction: tuple[float, float] = (0.0, 0.2)
    """Warmup as a fraction of the run's steps, uniform in [low, high]: a schedule found on short trials
    keeps its shape on the longer run that uses it."""
    floor: tuple[float, float] = (0.0, 0.2)
    """Final learning rate as a fraction of the peak, uniform in [low, high]."""
    weight_decay: list[float] | None = Field(None, min_length=1)
    """Optional AdamW weight decays to choose from; default: the target stage's."""
    micro_batch_size: list[int] | None = Field(None, min_length=1)
    """Optional micro batch sizes to choose from; default: the target stage's."""

    @field_validator("peak")
    @classmethod
    def _peak(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0:
            raise ValueError(f"a log-uniform range needs low > 0 (got {value[0]:g})")
        return _ordered(value)

    @field_validator("warmup_fraction")
    @classmethod
    def _warmup(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not (0 <= value[0] and value[1] < 1):
            raise ValueError(f"fractions of the run must lie in [0, 1) (got [{value[0]:g}, {value[1]:g}])")
        return _ordered(value)

    @field_validator("floor")
    @classmethod
    def _floor(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not (0 <= value[0] and value[1] <= 1):
            raise ValueError(f"fractions of the peak must lie in [0, 1] (got [{value[0]:g}, {value[1]:g}])")
        return _ordered(value)

    @field_validator("weight_decay")
    @classmethod
    def _decay(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(v < 0 for v in value):
            raise ValueError(f"weight decays must be >= 0 (got {value})")
        return value

    @field_validator("micro_batch_size")
    @classmethod
    def _micro(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(v < 1 for v in value):
            raise ValueError(f"micro batch sizes must be >= 1 (got {value})")
        return value


class SweepConfig(Section):
    """Ray Tune over learning-rate schedules: every trial a Ray Train run of the one loop, ASHA on `step`."""

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"enabled", "max_concurrent_trials"})

    enabled: bool = False
    """Run this stage in `llmray run` (before its target stage)."""
    target: Literal["pretrain", "finetune"] = "pretrain"
    """The stage whose config (model, data, batch, DeepSpeed) each trial runs, with a swept schedule."""
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    """The search space over the schedule."""
    search: Literal["random", "grid", "optuna"] = "random"
    """random: `num_trials` draws; grid: every kind x `grid_peaks` log-spaced peaks (warmup and floor at
    the middle of their ranges); optuna: Optuna's TPE sampler through Ray Tune's searcher."""
    num_trials: int = Field(8, ge=1)
    """Trials for random and optuna search (grid search runs its whole grid)."""
    grid_peaks: int = Field(3, ge=1)
    """Peaks per kind for grid search, log-spaced over `space.peak`."""
    max_steps: int = Field(60, ge=2)
    """Optimizer steps of a trial that is never stopped; its schedule decays over these."""
    eval_every: int = Field(10, ge=1)
    """Validation loss (and the `step` Tune schedules on) every this many steps."""
    eval_batches: int = Field(4, ge=1)
    """Validation batches per evaluation (the same held-out batches for every trial)."""
    scheduler: Literal["asha", "none"] = "asha"
    """asha stops trials whose validation loss trails at a rung; none runs every trial to the end."""
    grace_period: int = Field(20, ge=1)
    """ASHA: steps every trial runs before it can be stopped (the first rung)."""
    reduction_factor: float = Field(3.0, gt=1)
    """ASHA: rungs at grace x factor^k steps; about 1/factor of the trials go on at each rung."""
    seed: int = 0
    """Seed of the searcher's draws (trials train with the target stage's seed)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once; default: derived from the cluster (one per worker group that fits)."""
    sizing: SizingOverride = Field(default_factory=SizingOverride)
    """Per-trial worker sizing overrides (default: one worker per trial)."""

    @model_validator(mode="after")
    def _steps(self) -> SweepConfig:
        if self.grace_period > self.max_steps:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_steps ({self.max_steps})")
        if self.eval_every > self.grace_period and self.scheduler == "asha":
            raise ValueError(f"eval_every ({self.eval_every}) must be <= grace_period ({self.grace_period}): "
                             "ASHA compares trials at evaluated steps")
        return self
