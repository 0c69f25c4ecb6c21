"""The sweep section: Ray Tune over learning-rate schedules."""

from __future__ import annotations

from pydantic import Field

from llm.config.base import Section
from llm.config.train import SizingOverride


class SweepConfig(Section):
    """Ray Tune sweep over learning-rate schedules. Grown by the sweep issue."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once; default: derived from the cluster (one per worker group that fits)."""
    sizing: SizingOverride = Field(default_factory=SizingOverride)
    """Per-trial worker sizing overrides."""
