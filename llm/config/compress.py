"""The compress section: quantization, pruning, distillation."""

from __future__ import annotations

from pydantic import Field

from llm.config.base import Section
from llm.config.train import SizingOverride


class CompressConfig(Section):
    """Quantization, pruning and distillation. Grown by the compression issue."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    sizing: SizingOverride = Field(default_factory=SizingOverride)
    """Worker sizing for distillation runs."""
