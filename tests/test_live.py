"""Sizing checked against a live Ray cluster's resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.sizing import check_live, derive

from .conftest import tiny_config

pytestmark = pytest.mark.ray


def test_local_sizing_fits_live_cluster(ray_session, tmp_path: Path) -> None:
    assert check_live(derive(tiny_config(tmp_path))) == []


def test_shortfall_is_named(ray_session, tmp_path: Path) -> None:
    sizing = derive(tiny_config(tmp_path, "pretrain.sizing.workers=6", "pretrain.sizing.cpus_per_worker=2"))
    missing = check_live(sizing)
    assert missing == ["pretrain: 6 workers x 2 CPU = 12 CPUs asked, cluster has 4 now"]


def test_plan_job_connects_and_reports(ray_session, tmp_path: Path) -> None:
    """jobs/plan.py as `ray job submit` runs it: RAY_ADDRESS points at the cluster."""
    import os
    import subprocess
    import sys

    from .conftest import LOCAL_YAML, ROOT

    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "jobs/plan.py", str(LOCAL_YAML), "pretrain.sizing.workers=5"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "5 CPU workers x 1 CPU" in out.stdout
    assert "pretrain: 5 workers x 1 CPU = 5 CPUs asked, cluster has 4 now" in out.stdout
