"""The base of every config section and the names shared by all of them."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

LLM_PREFIX = "metadata.llm"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset()
    """Fields that change no output of the stage (logging, cadence, retries, placement): left out of the
    stage's config hash, so editing them never reruns a finished stage. Named here, once per section."""

    def hashed(self) -> dict[str, Any]:
        """The fields that change this section's outputs, as JSON values (nested sections likewise)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.NOT_HASHED:
                continue
            value = getattr(self, name)
            if isinstance(value, Section):
                out[name] = value.hashed()
            else:
                out[name] = self.model_dump(mode="json", include={name})[name]
        return out
