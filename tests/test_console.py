"""The calm console: the terminal gets the header and what the stage prints; library loggers, warnings, Ray's
loggers and workers' output go to the stage log; `--verbose` shows a worker's print while the task runs.
(The whole quickstart's line budget is checked on the `ray job submit` run in test_job_submit.py.)"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from llm.console import log_path, stage_console, through_root

from .conftest import ROOT, tiny_config


def test_prints_reach_the_terminal_and_library_output_the_log(tmp_path: Path, capfd) -> None:
    cfg = tiny_config(tmp_path).llm
    lib = logging.getLogger("llmray_test.lib")  # a library that logs to stderr with a handler of its own
    lib.addHandler(logging.StreamHandler(sys.stderr))
    lib.propagate = False
    last = logging.getLogger("llmray_test.last")  # one with Python's last-resort handler (its stream is fixed)
    last.addHandler(logging.lastResort)  # type: ignore[arg-type]
    last.propagate = False
    imported = logging.getLogger("llmray_test.imported")  # one handed to the root logger, as Ray's are
    imported.addHandler(logging.StreamHandler(sys.stderr))
    imported.propagate = False
    through_root("llmray_test.imported")
    try:
        with stage_console(cfg, "data", "testing") as log:
            print("the stage's own line")
            lib.warning("library chatter")
            imported.warning("handed-over chatter")
            last.warning("last-resort chatter")
            warnings.warn("a library warning", UserWarning, stacklevel=1)
        lib.warning("after the stage")
        assert last.handlers == [logging.lastResort]  # given back
    finally:
        lib.handlers.clear()
        last.handlers.clear()
    out, err = capfd.readouterr()
    assert out.splitlines() == [f"== data: testing -> {cfg.stage_dir('data')}  (log: {log})", "the stage's own line"]
    assert err == "after the stage\n"  # the library's handler is its own again
    text = log.read_text()
    assert "library chatter" in text and "handed-over chatter" in text and "a library warning" in text
    assert "last-resort chatter" in text
    assert "the stage's own line" not in text and "after the stage" not in text


_DRIVER = """
import sys, time
from pathlib import Path
import ray
from llm.console import stage_console
from llm.raycluster import connect
from tests.conftest import tiny_config

@ray.remote
def chatty(flag):
    print("worker says hello", flush=True)
    while not Path(flag).exists():  # the task runs until the test has seen (or not) its line
        time.sleep(0.1)

cfg = tiny_config(Path(sys.argv[1])).llm
with stage_console(cfg, "data", "testing", verbose=sys.argv[2] == "1") as log:
    connect(cfg)
    ray.get(chatty.remote(sys.argv[3]))
"""


def _driver(ray_session, tmp_path: Path, verbose: bool) -> tuple[subprocess.Popen[str], Path]:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    flag = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), "1" if verbose else "0", str(flag)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, flag


@pytest.mark.ray
def test_ray_and_worker_output_stay_in_the_log(ray_session, tmp_path: Path) -> None:
    proc, flag = _driver(ray_session, tmp_path, verbose=False)
    cfg = tiny_config(tmp_path).llm
    log_file = log_path(cfg, "data")
    try:
        deadline = time.monotonic() + 120
        while "worker says hello" not in (log_file.read_text() if log_file.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
    finally:
        flag.touch()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert out.splitlines() == [f"== data: testing -> {cfg.stage_dir('data')}  (log: {log_file})"]
    text = log_file.read_text()
    assert "(chatty pid=" in text and "Connecting to existing Ray cluster" in text  # the worker's and Ray's


@pytest.mark.ray
def test_verbose_shows_a_worker_print_while_it_runs(ray_session, tmp_path: Path) -> None:
    proc, flag = _driver(ray_session, tmp_path, verbose=True)
    seen: list[str] = []
    give_up = threading.Timer(120, flag.touch)  # the line never came: the task ends, so does the loop below
    give_up.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the task is still blocked when its line arrives: shown live, not at exit
            seen.append(line)
            if "worker says hello" in line:
                break
    finally:
        flag.touch()
        give_up.cancel()
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "worker says hello" in seen[-1] and "(chatty pid=" in seen[-1], out
    assert "Connecting to existing Ray cluster" in out  # Ray's own log lines too
