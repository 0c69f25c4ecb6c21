"""A real sweep on the session Ray: 6 trials of Ray Train runs over 2+ schedule kinds with ASHA on `step`,
interrupted after 3 trials (as Ctrl-C does) and continued; early-stopped trials free their workers and
placement groups; trials.csv, best.json and curves.png agree; `pretrain.lr=best` trains with the winner."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from llm.config import ScheduleConfig
from llm.manifest import manifest_hash, read_manifest
from llm.train.schedules import lr_at
from llm.tune.results import read_csv
from tests.train.conftest import build_data_stage, train_config

# What tests.train.conftest.train_config adds to cluster/local.yaml, for the driver started beside this one.
_TRAIN = ("data.seq_len=32", "pretrain.model.context=32", "pretrain.max_steps=6", "pretrain.micro_batch_size=4",
          "pretrain.checkpoint_every=3", "pretrain.eval_every=3", "pretrain.eval_batches=2", "pretrain.log_every=1",
          "pretrain.lr.warmup_steps=2", "pretrain.lr.peak=3e-3", "pretrain.max_failures=0")

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]

SWEEP = ("sweep.enabled=true", "sweep.num_trials=6", "sweep.max_steps=12", "sweep.eval_every=2",
         "sweep.eval_batches=2", "sweep.grace_period=4", "sweep.reduction_factor=2", "sweep.seed=8",
         "sweep.space.kind=[cosine, constant, linear]", "sweep.space.peak=[1e-4, 3e-2]",
         "sweep.sizing.cpus_per_worker=1", "sweep.max_concurrent_trials=2")


def _free_again(ray, timeout: float = 60.0) -> tuple[dict, list]:
    """Wait until every CPU is available and no placement group is left alive."""
    from ray.util import placement_group_table

    deadline = time.time() + timeout
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        alive = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if (free.get("CPU", 0) == total.get("CPU") and not alive) or time.time() > deadline:
            return free, alive
        time.sleep(1)


INTERRUPTED = """
import sys
from llm import tracking
from llm.loading import load_config
from llm.errors import TrainingError
from llm.tune.stage import STAGE, run
cfg = load_config(sys.argv[1], sys.argv[2:]).llm
try:
    tracking.tracked(cfg, STAGE, lambda: run(cfg, interrupt_after=3))
except TrainingError as e:
    print(e)
"""


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory, request):
    """The sweep interrupted (as Ctrl-C does) in a separate driver once 3 trials ended, as a user's
    `llmray sweep` would be, then continued here. The other driver exiting ends its Ray job, so what
    its trials held is Ray's to free, as it is after a real interruption. Both drivers track the stage in
    the session's MLflow server (`tracking.mlflow`: not hashed, so no other test here sees it) when MLflow is
    installed."""
    import importlib.util
    import subprocess
    import sys

    from llm import tracking
    from llm.tune.stage import STAGE, run
    from tests.conftest import LOCAL_YAML, ROOT

    track = [f"tracking.mlflow.uri={request.getfixturevalue('mlflow_server')}", "tracking.mlflow.experiment=t-sweep"] \
        if importlib.util.find_spec("mlflow") else []
    tmp = tmp_path_factory.mktemp("sweep")
    loaded = train_config(tmp, *SWEEP, *track)
    build_data_stage(loaded)
    folder = Path(loaded.llm.stage_dir("sweep"))
    t0 = time.perf_counter()
    address = ray_session.get_runtime_context().gcs_address
    overrides = [f"storage={tmp / 'runs'}", *_TRAIN, *SWEEP, *track, f"ray.address={address}"]
    done = subprocess.run([sys.executable, "-c", INTERRUPTED, str(LOCAL_YAML), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert "interrupted with" in done.stdout and "of 6 trials done; rerun" in done.stdout, done.stderr[-2000:]
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in (folder / "trials").glob("*/trial.json")}
    assert read_manifest(folder) is None  # an interrupted sweep is never committed
    _free_again(ray_session)
    result = tracking.tracked(loaded.llm, STAGE, lambda: run(loaded.llm))
    seconds = time.perf_counter() - t0
    return loaded, result, folder, finished_before, seconds


def test_sweep_runs_asha_and_writes_its_record(swept, capsys) -> None:
    loaded, result, folder, _, seconds = swept
    rows = read_csv(folder / "trials.csv")
    assert len(rows) == 6 and not result.skipped
    assert len({r["kind"] for r in rows}) >= 2
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert stopped, "ASHA stopped no trial"
    assert all(int(r["steps"]) < 12 for r in stopped) and all(int(r["steps"]) == 12 for r in finished)
    assert all(int(r["steps"]) >= 4 for r in rows)  # the grace period: nobody stopped before step 4
    png = (folder / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for r in rows:  # each trial's own folder holds its metrics, and they agree with Tune's record
        recs = [json.loads(x) for x in (folder / "trials" / r["trial_id"] / "metrics.jsonl").read_text().splitlines()]
        vals = [x["val_loss"] for x in recs if "val_loss" in x]
        assert recs[-1]["step"] >= int(r["steps"]) and float(r["final_val_loss"]) in [pytest.approx(v) for v in vals]
    manifest = read_manifest(folder)
    assert manifest is not None and manifest.metrics["trials"] == 6
    assert manifest.metrics["steps_spent"] == sum(int(r["steps"]) for r in rows) < 6 * 12
    print(f"sweep of 6 trials (interrupted and continued) took {seconds:.0f}s")


def test_best_json_is_the_lowest_val_loss_in_trials_csv(swept) -> None:
    _, _, folder, _, _ = swept
    rows = read_csv(folder / "trials.csv")
    best = json.loads((folder / "best.json").read_text())
    finished = [r for r in rows if r["status"] == "finished"]
    lowest = min(finished, key=lambda r: float(r["final_val_loss"]))
    assert best["trial_id"] == lowest["trial_id"]
    assert best["final_val_loss"] == pytest.approx(float(lowest["final_val_loss"]))
    assert best["final_val_loss"] <= min(float(r["best_val_loss"]) for r in rows if r["status"] != "error")
    assert best["schedule"]["kind"] == lowest["kind"]
    assert best["schedule"]["peak"] == pytest.approx(float(lowest["peak"]))


def test_rerun_after_interruption_skipped_finished_trials(swept) -> None:
    loaded, result, folder, before, _ = swept
    rows = {r["trial_id"] for r in read_csv(folder / "trials.csv")}
    assert result.metrics["resumed"] is True
    untouched = {t for t, mtime in before.items() if (folder / "trials" / t / "trial.json").stat().st_mtime_ns == mtime}
    assert len(untouched) >= 3, "the trials finished before the interruption were run again"
    assert untouched <= rows  # the same trials (ids), not a new sweep beside the old one
    from llm.tune.stage import run

    again = run(loaded.llm)  # a finished sweep: the manifest matches, nothing runs
    assert again.skipped


def test_every_trial_is_an_mlflow_run_nested_under_the_sweeps(swept, mlflow_server) -> None:
    """Each trial's run: its sampled values as params, every step rank 0 logged (the run of a trial cut off by
    the interruption replaced, not doubled), its outcome; the sweep's run is the one both drivers used."""
    import mlflow

    _, _, folder, _, _ = swept
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("t-sweep").experiment_id
    stage = client.search_runs([experiment], "tags.`llmray.stage` = 'sweep' and tags.`mlflow.parentRunId` != ''")
    sweep = [r for r in stage if "llmray.trial_id" not in r.data.tags]
    assert len(sweep) == 1 and sweep[0].info.status == "FINISHED", [r.data.tags for r in sweep]
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep[0].info.run_id}'")
    rows = {r["trial_id"]: r for r in read_csv(folder / "trials.csv")}
    assert sorted(r.data.tags["llmray.trial_id"] for r in trials) == sorted(rows), "one run per trial"
    best = json.loads((folder / "best.json").read_text())["trial_id"]
    for run in trials:
        trial_id = run.data.tags["llmray.trial_id"]
        row, tags = rows[trial_id], run.data.tags
        assert run.info.run_name == trial_id and tags["llmray.stage"] == "sweep"
        assert run.data.params["kind"] == row["kind"]
        assert float(run.data.params["peak"]) == pytest.approx(float(row["peak"]))
        assert tags["llmray.trial_status"] == row["status"] and tags["llmray.best"] == str(trial_id == best).lower()
        assert tags["llmray.stopped_early"] == str(row["status"] == "stopped").lower()
        assert run.info.status == ("FAILED" if row["status"] == "error" else "FINISHED")
        assert run.data.metrics["steps"] == int(row["steps"])
        recs = [json.loads(x) for x in (folder / "trials" / trial_id / "metrics.jsonl").read_text().splitlines()]
        for key in ("loss", "lr", "tokens_per_s", "val_loss"):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            wrote = sorted((r["step"], r[key]) for r in recs if isinstance(r.get(key), float | int))
            # A worker killed between writing a step to metrics.jsonl and sending it (the interruption, or
            # a trial ASHA stops) leaves that one step out of MLflow: every other step is there, in order.
            assert wrote and len(logged) >= len(wrote) - 1, (trial_id, key)
            assert [s for s, _ in logged] == [s for s, _ in wrote][:len(logged)], (trial_id, key)
            assert [v for _, v in logged] == pytest.approx([v for _, v in wrote][:len(logged)]), (trial_id, key)
    assert any(r.data.tags["llmray.stopped_early"] == "true" for r in trials)


def test_stopped_trials_release_their_resources(swept) -> None:
    import ray

    free, alive = _free_again(ray)
    assert free.get("CPU") == ray.cluster_resources().get("CPU"), free
    assert alive == [], alive


def test_pretrain_lr_best_trains_with_the_winner(swept, capsys) -> None:
    from llm.train.pretrain import run

    loaded, _, folder, _, _ = swept
    best = json.loads((folder / "best.json").read_text())
    cfg = train_config(Path(loaded.llm.storage).parent, *SWEEP, "pretrain.lr=best", "pretrain.max_steps=4",
                       "pretrain.checkpoint_every=4").llm
    result = run(cfg)
    out = capsys.readouterr().out
    assert f"lr: best from {folder}" in out and best["trial_id"] in out
    manifest = read_manifest(result.path)
    assert manifest is not None
    assert manifest.metrics["lr_from"]["trial_id"] == best["trial_id"]
    assert manifest.inputs["sweep"] == manifest_hash(folder)
    recs = [json.loads(x) for x in (Path(result.path) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "lr" in r]
    # Every step's LR is the winner's schedule (warmup rescaled to this run's 4 steps), not pretrain's own.
    won = ScheduleConfig(**{**best["schedule"], "warmup_steps": round(best["warmup_fraction"] * 4)})
    own = train_config(Path(loaded.llm.storage).parent, *SWEEP, "pretrain.max_steps=4").llm.pretrain.schedule()
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert math.isclose(r["lr"], lr_at(r["step"] - 1, 4, won), rel_tol=1e-6), (r, won)
    assert any(not math.isclose(r["lr"], lr_at(r["step"] - 1, 4, own), rel_tol=1e-3) for r in recs)
