"""The config reference in Markdown, generated from the typed config (the README embeds it)."""

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


def config_reference() -> str:
    """A Markdown table of every `metadata.llm` key with its default and description."""
    header = ["| key (under `metadata.llm`) | default | meaning |", "|---|---|---|"]
    return "\n".join(header + _rows(PipelineConfig, ""))


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def embedded_reference(readme: str) -> str:
    """The reference block currently between the README's markers."""
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


def refresh_readme(path: str = "README.md") -> bool:
    """Rewrite the README's reference block from the config; True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    new = f"{head}{START}\n{config_reference()}\n{END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    import sys

    print("README.md updated" if refresh_readme(*sys.argv[1:]) else "README.md already current")
