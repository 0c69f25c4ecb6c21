"""Sizing checked against a live Ray cluster's resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.sizing import check_live, derive

from .conftest import tiny_config

pytestmark = pytest.mark.ray


def test_local_sizing_fits_live_cluster(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    assert check_live(derive(tiny_config(tmp_path))) == []


def test_shortfall_is_named(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    sizing = derive(tiny_config(tmp_path, "pretrain.sizing.workers=6", "pretrain.sizing.cpus_per_worker=2"))
    missing = check_live(sizing)
    assert missing == ["pretrain: 6 workers x 2 CPU = 12 CPUs asked, cluster has 4 now"]
