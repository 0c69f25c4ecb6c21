"""Experiment tracking (`llm.tracking`) against a real MLflow tracking server (SQLite backend, the session's
`mlflow_server` in tests/conftest.py) and W&B in offline mode (its run files checked). The stage is a trivial
body under the real stage contract (`llm.stage.execute`) run through `llm.stages.run_stage`, so the hooks are
the ones `llmray` uses; its "training" steps go through rank 0's real `MetricsLog` with the sinks a training
stage hands its workers. The sweep's trial runs and compress's logged model are checked where those stages
already run (tests/tune/test_sweep_ray.py, tests/compress/test_stage_ray.py), on the runs they make there."""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llm import stages, tracking
from llm.stage import Stage, StageResult, execute
from llm.train.metrics import MetricsLog
from tests.conftest import tiny_config

mlflow = pytest.importorskip("mlflow")


def _fake_stage(monkeypatch: pytest.MonkeyPatch, fail: list[bool]) -> Stage:
    """A stage named `data` (its section is the hashed config) whose body writes an eval table and a plot,
    logs three steps through `MetricsLog` with the stage's worker sinks, and raises once while `fail[0]`."""

    def body(folder: Any) -> dict[str, Any]:
        out = Path(folder.local)
        (out / "eval.json").write_text(json.dumps({"ppl": 12.5}))
        (out / "plots").mkdir(exist_ok=True)
        (out / "plots" / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        (out / "ray").mkdir(exist_ok=True)
        (out / "ray" / "skip.png").write_bytes(b"not an artifact")
        sinks = tracking.worker_sinks()
        log = MetricsLog(out, max_steps=3, log_every=10, mlflow_uri=sinks.get("mlflow_uri"), name="data",
                         mlflow_run_id=sinks.get("mlflow_run_id"))
        for step in (1, 2, 3):
            log.log({"step": step, "loss": 4.0 / step, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.01})
        log.close()
        if fail[0]:
            fail[0] = False
            raise RuntimeError("interrupted")
        return {"rows": 7, "funnel": {"kept": 5, "dropped": 2}, "note": "text is not a metric"}

    def run(cfg: Any, force: bool = False) -> StageResult:
        return execute(cfg, stage, body, force=force)

    stage = Stage("data", "a trivial stage", run, sections=("data",), resumable=True)
    monkeypatch.setattr(stages, "by_name", lambda name: stage)
    return stage


def test_mlflow_parent_nested_params_metrics_artifacts_and_resume(mlflow_server: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, f"tracking.mlflow.uri={mlflow_server}", "tracking.mlflow.experiment=t-tracking").llm
    fail = [True]
    _fake_stage(monkeypatch, fail)
    with pytest.raises(RuntimeError), tracking.pipeline_run(cfg):
        stages.run_stage(cfg, "data", quiet=True)
    with tracking.pipeline_run(cfg):  # `llmray run` again: the same parent, the stage's run continued
        stages.run_stage(cfg, "data", quiet=True)
        Path(cfg.storage, cfg.run, "report.html").write_text("<html>report</html>")
    stages.run_stage(cfg, "data", quiet=True)  # the stage alone (skipped: done), still its own run

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("t-tracking")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1, [r.data.tags for r in runs]
    parent, child = parents[0], children[0]
    assert parent.info.run_name == cfg.run and parent.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.run_name == "data" and child.info.status == "FINISHED"

    tags = child.data.tags
    assert tags["llmray.run"] == cfg.run and tags["llmray.stage"] == "data"
    params, digest = tracking.stage_params(cfg, stages.by_name("data"))
    assert tags["llmray.config_hash"] == digest
    assert len(tags["llmray.git_commit"]) == 40  # the tests run in a git checkout
    assert child.data.params["data.seq_len"] == str(cfg.data.seq_len)
    assert set(child.data.params) == set(params) and "data.dedup.exact" in child.data.params

    metrics = child.data.metrics
    assert metrics["rows"] == 7 and metrics["funnel.kept"] == 5 and "note" not in metrics
    history = client.get_metric_history(child.info.run_id, "loss")
    assert sorted({(m.step, m.value) for m in history}) == [(1, 4.0), (2, 2.0), (3, 4.0 / 3)]

    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert arts == {"eval.json", "plots"}, arts
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/curve.png"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["report.html"]

    ids = json.loads(Path(cfg.storage, cfg.run, tracking.RUNS_FILE).read_text())
    stored = ids["mlflow"][f"{mlflow_server} t-tracking"]
    assert stored["data"]["run_id"] == child.info.run_id and stored["pipeline"]["run_id"] == parent.info.run_id


def test_a_failed_stage_ends_its_run_failed(mlflow_server: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, f"tracking.mlflow.uri={mlflow_server}", "tracking.mlflow.experiment=t-failed").llm
    _fake_stage(monkeypatch, [True])
    with pytest.raises(RuntimeError):
        stages.run_stage(cfg, "data", quiet=True)
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("t-failed").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"data": "FAILED", cfg.run: "FAILED"}
    assert tracking.worker_sinks() == {}


def test_wandb_offline_run_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path, "tracking.wandb.project=llmray-test").llm
    _fake_stage(monkeypatch, [False])
    with tracking.pipeline_run(cfg):
        stages.run_stage(cfg, "data", quiet=True)
        Path(cfg.storage, cfg.run, "report.html").write_text("<html>report</html>")
    # W&B names an offline run's folder by the second it starts: a rerun within the same second would share it.
    time.sleep(1.1)
    stages.run_stage(cfg, "data", force=True, quiet=True)  # rerun, same config: the same W&B run id

    ids = json.loads(Path(cfg.storage, cfg.run, tracking.RUNS_FILE).read_text())["wandb"]["llmray-test"]
    run_id = ids["data"]["run_id"]
    root = Path(cfg.storage, cfg.run, "wandb")
    dirs = sorted(glob.glob(str(root / f"offline-run-*-{run_id}")))
    assert len(dirs) == 2, os.listdir(root)
    first = Path(dirs[0])
    assert (first / "files" / "eval.json").is_file() and (first / "files" / "plots" / "curve.png").is_file()
    # The run record is protobuf in W&B's log format: the names and config keys are there as bytes.
    blob = (first / f"run-{run_id}.wandb").read_bytes()
    for needle in (b"llmray-test", cfg.run.encode(), b"data.seq_len", b"rows", b"funnel.kept", b"loss"):
        assert needle in blob, needle
    pipeline = glob.glob(str(root / f"offline-run-*-{ids['pipeline']['run_id']}" / "files" / "report.html"))
    assert len(pipeline) == 1


@pytest.mark.multiprocess  # DeepSpeed's gloo group in this process
def test_training_steps_land_in_the_stage_run(mlflow_server: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The one loop in this process (as `sizing.workers: 0` runs it) with the sinks `recipe.fit` puts in its
    spec, sent through the spec's dict form (what Ray Train hands each worker): rank 0 logs every step into
    the tracked stage's run."""
    from llm.config import ModelConfig, ScheduleConfig, TrainConfig
    from llm.train.data import write_rows
    from llm.train.loop import run_loop
    from llm.train.runtime import LocalRuntime
    from llm.train.spec import LoopSpec

    cfg = tiny_config(tmp_path, f"tracking.mlflow.uri={mlflow_server}", "tracking.mlflow.experiment=t-loop").llm
    rows = (np.arange(64)[:, None] + np.arange(16)[None, :]) % 64
    files = write_rows(rows.astype(np.int32), tmp_path / "shards", shards=1)
    train = TrainConfig(max_steps=3, micro_batch_size=8, zero_stage=0, precision="fp32", eval_every=100,
                        log_every=10, max_failures=0, lr=ScheduleConfig(kind="constant", peak=1e-3, warmup_steps=0))
    model = ModelConfig(arch="llama", n_layers=1, d_model=32, n_heads=2, context=16)

    def fit() -> StageResult:
        spec = LoopSpec(train=train, model=model, vocab_size=64, seq_len=16, train_files=files, export=False,
                        out_dir=str(tmp_path / "run"), peak_flops=1e12, tracking=tracking.worker_sinks())
        spec = LoopSpec.from_dict(spec.to_dict())
        run_loop(spec, LocalRuntime(checkpoint_root=str(tmp_path / "ckpt"), keep=2, device="cpu"))
        return StageResult("pretrain", str(tmp_path / "run"), skipped=False)

    stage = Stage("pretrain", "a training stage", lambda cfg, force=False: fit(), sections=("pretrain",))
    tracking.tracked(cfg, stage, fit)
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("t-loop").experiment_id],
                              "tags.`llmray.stage` = 'pretrain'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in ("loss", "lr", "tokens_per_s", "mfu"):
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, key)] == [1, 2, 3], key


def test_tracking_is_off_by_default_and_tensorboard_reaches_the_workers(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def call() -> StageResult:
        seen.append(tracking.worker_sinks())
        return StageResult("data", "", skipped=False)

    stage = Stage("data", "x", lambda cfg, force=False: call(), sections=("data",))
    for overrides, sinks in (((), {}), (("tracking.tensorboard=true",), {"tensorboard": True})):
        cfg = tiny_config(tmp_path, *overrides).llm
        assert not cfg.tracking.enabled
        tracking.tracked(cfg, stage, call)
        assert seen.pop() == sinks and tracking.worker_sinks() == {}
    assert not Path(cfg.storage, cfg.run, tracking.RUNS_FILE).exists()
