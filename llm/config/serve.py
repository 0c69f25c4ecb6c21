"""The serve section: the Ray Serve OpenAI-compatible application."""

from __future__ import annotations

from pydantic import Field

from llm.config.base import Section


class ServeConfig(Section):
    """Ray Serve OpenAI-compatible application. Grown by the serving issue."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    min_replicas: int | None = Field(None, ge=0)
    """Autoscaling lower bound; default 1."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling upper bound; default: one per GPU (or per 2 CPUs on CPU clusters)."""
