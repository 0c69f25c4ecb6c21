"""A chaos test of the stage contract: four stages (written like data, pretrain, finetune and compress write)
run through `llm.stage.execute` in a subprocess that is killed (`os._exit(137)` at a random storage call, so no
cleanup runs: inside bodies, checkpoints, the attempt marker, the upload, the commit, the lease) or fed
transient storage faults (every Nth call fails), on a local disk and on a real S3 API, then rerun until done.

After every round: every committed stage's files match its manifest (sizes and sha256) and no commit was lost
or changed. At the end: every output equals an undisturbed run's, and no training step was redone beyond the
last checkpoint before each kill. The table is printed (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from llm import storage
from llm.manifest import MANIFEST, manifest_hash, read_manifest
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
STAGES = ("data", "pretrain", "finetune", "compress")
EVERY = {"pretrain": 2, "finetune": 1}  # the drivers' checkpoint intervals
KILLS, FAULT_ROUNDS = 15, 15  # per storage kind: 30 kill points and 30 fault rounds in all


class Driver:
    """The chaos driver in `--serve` mode: one interpreter, a forked child per run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.storage.chaos_driver", "--serve"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy())

    def run(self, root: str, executed: Path, env: dict[str, str]) -> tuple[int, str]:
        out = self.tmp / "round.out"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"root": root, "executed": str(executed), "env": env, "out": str(out)})
                              + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["code"]
        return code, out.read_text()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _outputs(root: str) -> dict[str, dict[str, str]]:
    """Each stage folder's files (bookkeeping aside) -> sha256."""
    out = {}
    for stage in STAGES:
        uri = storage.join(root, "local-tiny", stage)
        out[stage] = {rel: storage.sha256(storage.join(uri, rel)) for rel in storage.list_files(uri)
                      if rel != MANIFEST and not rel.startswith(("_CHECKSUMS", "_ATTEMPT"))}
    return out


def _check_commits(root: str, committed: dict[str, str]) -> int:
    """Verify every committed stage against its manifest; returns how many earlier commits are gone or changed."""
    lost = 0
    for stage in STAGES:
        uri = storage.join(root, "local-tiny", stage)
        digest = manifest_hash(uri)
        if stage in committed and digest != committed[stage]:
            lost += 1
        if digest is not None:
            manifest = read_manifest(uri, verify=True)  # raises when a listed file is missing or differs
            assert manifest is not None
            committed[stage] = digest
    return lost


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_no_kill_or_fault_undoes_a_commit(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base = request.getfixturevalue("s3_prefix") if where == "s3" else str(tmp_path / "chaos")
    rng = random.Random(17)
    driver = Driver(tmp_path)
    _run = driver.run
    code, out = _run(str(tmp_path / "reference"), tmp_path / "reference.log", {})
    assert code == 0, out
    reference = _outputs(str(tmp_path / "reference"))
    calls = int(out.strip().splitlines()[-2].split()[-1])  # the driver prints its storage calls, then faults
    kills = faults = injected = rounds = lost = episodes = 0
    redone_total = allowed = 0
    while kills < KILLS or faults < FAULT_ROUNDS:
        episodes += 1
        root, executed, committed = f"{base}/e{episodes}", tmp_path / f"e{episodes}.log", {}
        killed_in_training = 0
        code = None
        while code != 0:  # rerun until done
            rounds += 1
            env: dict[str, str] = {}
            if kills < KILLS and (faults >= FAULT_ROUNDS or rng.random() < 0.5):
                env["CHAOS_KILL_AT"] = str(rng.randint(1, calls))
            elif faults < FAULT_ROUNDS:
                env.update(CHAOS_FAULT_EVERY=str(rng.randint(4, 12)), CHAOS_FAULT_OFFSET=str(rng.randint(0, 11)))
            before = _lines(executed)
            code, out = _run(root, executed, env)
            assert code in (0, 3, 137), out
            if code == 3:  # a stage stopped on a fault: one line saying why
                assert out.strip().splitlines()[-3].split(":")[0] in ("StorageError", "ConnectionResetError"), out
            kills += code == 137
            if "CHAOS_FAULT_EVERY" in env:
                faults += 1
                injected += int(out.strip().splitlines()[-1].split()[-1])
            killed_in_training += code == 137 and _lines(executed) != before
            lost += _check_commits(root, committed)
        before = _lines(executed)
        code, out = _run(root, executed, {})  # a clean rerun finds everything committed and redoes nothing
        assert code == 0 and _lines(executed) == before, out
        steps = Counter(line for line in executed.read_text().split("\n") if line)
        redone_total += sum(n - 1 for n in steps.values())
        allowed += killed_in_training * max(EVERY.values())
        assert _outputs(root) == reference  # the same outputs as an undisturbed run
    print(f"\nchaos ({where}): rounds {rounds}, episodes {episodes}, kills {kills}, fault rounds {faults} "
          f"({injected} faults injected), commits lost {lost} (goal 0), training steps redone {redone_total} "
          f"(bound {allowed})")
    driver.close()
    assert lost == 0
    assert redone_total <= allowed


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
