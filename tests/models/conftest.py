"""The model zoo (`tests.models.zoo`), each family written at most once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.models.zoo import write_family


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`zoo(name)`: the directory of family `name`, written on first use (treat it as read-only)."""
    root = tmp_path_factory.mktemp("zoo")
    written: dict[str, Path] = {}

    def family_dir(name: str) -> Path:
        if name not in written:
            written[name] = write_family(name, root / name)
        return written[name]

    return family_dir
