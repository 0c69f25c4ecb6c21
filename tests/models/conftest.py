"""The model zoo (`tests.models.zoo`), each family written at most once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.models.zoo import write_family

_WRITTEN: dict[str, Path] = {}
"""Family -> its directory, shared by every module that re-exports the fixture (`zoo = conftest.zoo`):
pytest keeps one session fixture per place it is declared, the families are written once all the same."""


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`zoo(name)`: the directory of family `name`, written on first use (treat it as read-only)."""

    def family_dir(name: str) -> Path:
        if name not in _WRITTEN:
            _WRITTEN[name] = write_family(name, tmp_path_factory.mktemp("zoo") / name)
        return _WRITTEN[name]

    return family_dir
