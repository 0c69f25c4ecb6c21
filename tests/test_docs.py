"""The docs that are generated from code are current."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.cli import main
from llm.configdoc import REGENERATE

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema", "--markdown"]) == 0
    generated = capsys.readouterr().out
    page = ROOT / "docs" / "config.md"
    assert page.exists(), f"docs/config.md is missing; run: {REGENERATE}"
    assert page.read_text(encoding="utf-8") == generated, f"docs/config.md is stale; run: {REGENERATE}"
