"""The config reference in Markdown, generated from the typed config.

`docs/config.md` is exactly this text, written by `python -m llm config-schema --markdown > docs/config.md`;
tests/test_docs.py fails when the file and the config disagree.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from llm.config import PipelineConfig


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if str(value) == "PydanticUndefined":
        return "**required**"
    return f"`{value!r}`".replace("'", '"') if isinstance(value, str | list) else f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        desc = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{key}` | {_default(field)} | {desc} |")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, f"{key}."))
    return rows


REGENERATE = "python -m llm config-schema --markdown > docs/config.md"


def config_reference() -> str:
    """`docs/config.md`: a one-line note that the page is generated and how to regenerate it, then a
    Markdown table of every `metadata.llm` key with its default and description."""
    note = ("Every key under `metadata.llm`, generated from the typed config in `llm/config/` by "
            f"`llm/configdoc.py`; do not edit by hand. Regenerate: `{REGENERATE}`")
    header = ["| key (under `metadata.llm`) | default | meaning |", "|---|---|---|"]
    return "\n".join([note, "", *header, *_rows(PipelineConfig, "")])
