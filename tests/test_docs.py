"""The docs generated from code are current."""

from __future__ import annotations

from pathlib import Path

from llm.configdoc import REGENERATE, config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current() -> None:
    # `llmray config-schema --markdown` prints config_reference(); print adds the final newline.
    generated = config_reference() + "\n"
    page = ROOT / "docs" / "config.md"
    assert page.exists(), f"docs/config.md is missing; run: {REGENERATE}"
    assert page.read_text(encoding="utf-8") == generated, f"docs/config.md is stale; run: {REGENERATE}"
