"""The base of every config section and the names shared by all of them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

LLM_PREFIX = "metadata.llm"
STAGE_SECTIONS = ("data", "pretrain", "sweep", "finetune", "compress", "serve")
"""The pipeline's stage sections, in run order."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
