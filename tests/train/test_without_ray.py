"""The one loop driven directly, where Ray cannot be imported: bench/train_gpu.py's path on a GPU box."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.multiprocess

# `sys.modules["ray"] = None` makes every `import ray` raise ImportError, as on a machine without it.
BLOCK_RAY = "import runpy, sys; sys.modules['ray'] = None; sys.argv = ['train_gpu.py', *sys.argv[1:]]; " \
            "runpy.run_path('bench/train_gpu.py', run_name='__main__')"


def test_train_gpu_bench_runs_without_ray() -> None:
    # A fresh process group: not the address this test process's own one-process group may hold.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                           "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", BLOCK_RAY, "--tiny", "--steps", "8", "--micro", "4"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "device: CPU; tiny" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("step "))
    first, last = (float(v) for v in line.rsplit("loss ", 1)[1].split(" -> "))
    # Uniform random tokens: the loss starts and stays at chance, log(vocab), and never diverges.
    assert abs(first - math.log(512)) < 0.3 and abs(last - math.log(512)) < 0.3, line
    assert "MFU" in line and "tokens/s" in line
