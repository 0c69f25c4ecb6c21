"""Experiment tracking: MLflow and W&B runs of the pipeline and its stages, through the libraries' own APIs.

The pipeline's `run` is one parent MLflow run; every stage is a nested run under it, with the stage's hashed
config as params (dotted keys), tags (run name, stage, config hash, git commit), its summary metrics at the
end and its `eval.json` and plots as artifacts (the pipeline's `report.html` on the parent). In W&B the same
structure is a run per stage, grouped by the run name. The run ids live in `<storage>/<run>/tracking.json`,
keyed by stage and config hash: a resumed or repeated stage with the same config continues its own run, a
changed config opens a new one. A stage that raises ends its runs FAILED.

The training workers log the per-step metrics themselves: `worker_sinks()` is what `llm.train.recipe.fit` puts
into the `LoopSpec`, and rank 0's `MetricsLog` logs into the stage's run by id. A tracking URI that names
this machine (`127.0.0.1`, a relative `sqlite:` path) must therefore be reachable from the worker's node.
A sweep trial is a run nested under the sweep's (`trial_run`, opened by the trial's driver; its rank 0 logs
there), ended by the sweep's driver with its outcome (`end_trials`). A stage that names a model (`Stage.model`:
compress, its chosen variant) logs it as an MLflow pyfunc model in its run, once.
`mlflow` and `wandb` are imported only when configured (`pip install 'llmray[tracking]'`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import PipelineConfig
from llm.errors import ConfigError
from llm.manifest import canonical_hash
from llm.stage import Stage, StageModel, StageResult, hashed_config

MODEL_TAG = "llmray.model"
"""Tag of a stage run: the model directory it logged as its MLflow model `model` (logged once per run)."""
TRIAL_TAG = "llmray.trial_id"
RUNS_FILE = "tracking.json"
"""`<storage>/<run>/tracking.json`: the MLflow and W&B run ids of the pipeline and of each stage."""
ARTIFACTS = ("eval.json", "*.png")
"""Files of a stage folder logged as artifacts (at any depth, checkpoints aside)."""
SKIP_DIRS = ("ray/", "checkpoints/", "tensorboard/", "wandb/")

_sinks: dict[str, Any] = {}
"""What the workers of the stage being tracked in this process log into (`worker_sinks`)."""

Finish = Callable[[StageResult], None]


def worker_sinks() -> dict[str, Any]:
    """The tracking sinks of the stage running in this process, for its training workers' `MetricsLog`:
    `mlflow_uri`, `mlflow_run_id`, `tensorboard` ({} when nothing is tracked)."""
    return dict(_sinks)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric leaves of a metrics tree, dotted keys (booleans and text left out)."""
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def stage_params(cfg: PipelineConfig, stage: Stage) -> tuple[dict[str, Any], str]:
    """The stage's hashed config as its manifest records it (`as_run` applied), flattened, and its hash."""
    run_cfg = stage.as_run(cfg) if stage.as_run else cfg
    hashed = hashed_config(run_cfg, *stage.hashed_sections(run_cfg))
    return flatten(hashed), canonical_hash(hashed)


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout this package runs from; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _tags(cfg: PipelineConfig, stage: str, digest: str | None) -> dict[str, str]:
    tags = {"llmray.run": cfg.run, "llmray.stage": stage}
    if digest:
        tags["llmray.config_hash"] = digest
    commit = git_commit()
    if commit:
        tags.update({"llmray.git_commit": commit, "mlflow.source.git.commit": commit})
    return tags


def _ids_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage, cfg.run, RUNS_FILE)


def _read_ids(cfg: PipelineConfig) -> dict[str, Any]:
    try:
        value = json.loads(storage.read_text(_ids_uri(cfg)))
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _remember(cfg: PipelineConfig, backend: str, key: str, name: str, entry: dict[str, Any]) -> None:
    ids = _read_ids(cfg)
    ids.setdefault(backend, {}).setdefault(key, {})[name] = entry
    storage.write_text(_ids_uri(cfg), json.dumps(ids, indent=2, sort_keys=True))


def _known(cfg: PipelineConfig, backend: str, key: str, name: str, digest: str | None) -> str | None:
    entry = _read_ids(cfg).get(backend, {}).get(key, {}).get(name)
    if not isinstance(entry, dict) or (digest is not None and entry.get("config_hash") != digest):
        return None
    return entry.get("run_id")


def _artifacts(uri: str, patterns: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
    """(a local copy of each matching file, its folder relative to `uri`)."""
    files = sorted(rel for rel in storage.list_files(uri)
                   if not rel.startswith(SKIP_DIRS) and any(fnmatch(rel.rsplit("/", 1)[-1], p) for p in patterns))
    with tempfile.TemporaryDirectory(prefix="llmray-track-") as tmp:
        local = storage.readable_here(uri, tmp, files)
        for rel in files:
            yield local / rel, rel.rpartition("/")[0]


def _import(module: str, key: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"metadata.llm.tracking.{key}: needs the `{module}` package "
                          "(pip install 'llmray[tracking]')") from None


# -- MLflow ---------------------------------------------------------------------------------------------------


def _mlflow_key(cfg: PipelineConfig) -> str:
    return f"{cfg.tracking.mlflow.uri} {cfg.tracking.mlflow.experiment}"


def _mlflow_run_id(mlflow: Any, cfg: PipelineConfig, name: str, digest: str | None) -> str | None:
    """The recorded run of `name` (for this config) when the server still has it."""
    run_id = _known(cfg, "mlflow", _mlflow_key(cfg), name, digest)
    if run_id is None:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


@contextlib.contextmanager
def _mlflow_parent(cfg: PipelineConfig) -> Iterator[Any]:
    """The pipeline's parent run, started or continued; ended when the block exits (FAILED on an error)."""
    mlflow = _import("mlflow", "mlflow")
    mlflow.set_tracking_uri(cfg.tracking.mlflow.uri)
    experiment = mlflow.set_experiment(cfg.tracking.mlflow.experiment)
    run_id = _mlflow_run_id(mlflow, cfg, "pipeline", None)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment.experiment_id,
                          run_name=None if run_id else cfg.run, tags=_tags(cfg, "pipeline", None)) as run:
        if run_id is None:
            _remember(cfg, "mlflow", _mlflow_key(cfg), "pipeline", {"run_id": run.info.run_id})
        yield run


@contextlib.contextmanager
def _mlflow_stage(cfg: PipelineConfig, stage: Stage, params: dict[str, Any], digest: str) -> Iterator[Finish]:
    mlflow = _import("mlflow", "mlflow")
    name = stage.name
    with contextlib.ExitStack() as stack:
        if mlflow.active_run() is None:  # one stage alone: its pipeline's parent run is continued around it
            stack.enter_context(_mlflow_parent(cfg))
        parent = mlflow.active_run()
        run_id = _mlflow_run_id(mlflow, cfg, name, digest)
        run = stack.enter_context(mlflow.start_run(
            run_id=run_id, nested=True, run_name=None if run_id else name,
            experiment_id=None if run_id else parent.info.experiment_id, tags=_tags(cfg, name, digest)))
        if run_id is None:
            _remember(cfg, "mlflow", _mlflow_key(cfg), name, {"run_id": run.info.run_id, "config_hash": digest})
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        _sinks.update(mlflow_uri=cfg.tracking.mlflow.uri, mlflow_run_id=run.info.run_id)

        def finish(result: StageResult) -> None:
            mlflow.log_metrics({**numbers(result.metrics), "stage_seconds": result.seconds})
            mlflow.set_tag("llmray.skipped", str(result.skipped).lower())
            for path, folder in _artifacts(cfg.stage_dir(name), ARTIFACTS):
                mlflow.log_artifact(str(path), artifact_path=folder or None)
            if stage.model is not None:
                _log_model(mlflow, stage.model(cfg))

        yield finish


def _log_model(mlflow: Any, model: StageModel) -> None:
    """`model` as the active run's MLflow model `model`: a pyfunc from its "models from code" file with its
    directory as the `model` artifact; skipped when the run (continued by a rerun) logged that directory
    already. The requirements are given, not inferred: MLflow would load the model in a subprocess to list
    its imports."""
    run_id, where = mlflow.active_run().info.run_id, model.path
    if mlflow.MlflowClient().get_run(run_id).data.tags.get(MODEL_TAG) == where:
        return
    try:
        project = f"llmray=={metadata.version('llmray')}"
    except metadata.PackageNotFoundError:  # a source checkout on the path, not installed
        project = "llmray"
    with tempfile.TemporaryDirectory(prefix="llmray-track-") as tmp:
        local = storage.readable_here(where, tmp, list(storage.list_files(where)))
        info = mlflow.pyfunc.log_model(name="model", python_model=str(model.code), artifacts={"model": str(local)},
                                       model_config=model.config or None,
                                       pip_requirements=[project, f"mlflow=={mlflow.__version__}"])
    mlflow.set_tags({MODEL_TAG: where, "llmray.model_uri": info.model_uri})


# -- MLflow: sweep trials ---------------------------------------------------------------------------------------


def _trial_runs(client: Any, parent: Any, trial_id: str | None = None) -> list[Any]:
    """The live runs of sweep trials nested under the sweep's run `parent` (of one trial, with `trial_id`)."""
    query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    if trial_id is not None:
        query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    return list(client.search_runs([parent.info.experiment_id], query, max_results=10_000))


@contextlib.contextmanager
def trial_run(sinks: dict[str, Any], trial_id: str, values: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The sinks of one sweep trial's workers: with the sweep tracked in MLflow (`sinks`, the sweep stage's
    `worker_sinks()`), a run nested under the sweep's, named and tagged by the trial id, with the trial's
    sampled values as params, and ended FAILED if the block raises, FINISHED when it ends (a trial its
    scheduler stops never gets there: `end_trials` ends every trial's run). A trial that starts over after
    an interruption starts a new run, its cut-off one deleted. Without MLflow, `sinks` as they are."""
    if not sinks.get("mlflow_run_id"):
        yield dict(sinks)
        return
    mlflow = _import("mlflow", "mlflow")
    from mlflow.entities import Param

    client = mlflow.MlflowClient(sinks["mlflow_uri"])
    parent = client.get_run(sinks["mlflow_run_id"])
    for old in _trial_runs(client, parent, trial_id):
        client.delete_run(old.info.run_id)
    shared = ("llmray.run", "llmray.stage", "llmray.config_hash", "llmray.git_commit", "mlflow.source.git.commit")
    tags = {k: v for k, v in parent.data.tags.items() if k in shared}
    run = client.create_run(parent.info.experiment_id, run_name=trial_id,
                            tags={**tags, TRIAL_TAG: trial_id, "mlflow.parentRunId": parent.info.run_id})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(values).items()])
    try:
        yield {**sinks, "mlflow_run_id": run_id}
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def end_trials(sinks: dict[str, Any], outcomes: Mapping[str, tuple[str, dict[str, Any]]], best: str) -> None:
    """End every trial's run once the sweep ended: `outcomes` maps a trial id to its status (`finished`,
    `stopped` by the scheduler, `error`) and summary metrics; tags `llmray.trial_status`,
    `llmray.stopped_early` and `llmray.best` (the winner `best`). An error ends FAILED, the rest FINISHED (as
    Ray's `MLflowLoggerCallback` ends a trial its scheduler stopped). Nothing without MLflow in `sinks`."""
    if not sinks.get("mlflow_run_id"):
        return
    mlflow = _import("mlflow", "mlflow")
    from mlflow.entities import Metric, RunTag

    client = mlflow.MlflowClient(sinks["mlflow_uri"])
    now = int(time.time() * 1000)
    for run in _trial_runs(client, client.get_run(sinks["mlflow_run_id"])):
        trial_id = run.data.tags.get(TRIAL_TAG)
        if trial_id not in outcomes:
            continue
        status, metrics = outcomes[trial_id]
        tags = {"llmray.trial_status": status, "llmray.stopped_early": str(status == "stopped").lower(),
                "llmray.best": str(trial_id == best).lower()}
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in numbers(metrics).items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run.info.run_id, "FAILED" if status == "error" else "FINISHED")


# -- W&B ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _wandb_run(cfg: PipelineConfig, name: str, params: dict[str, Any], digest: str | None) -> Iterator[Any]:
    """A W&B run `name` in the group of the pipeline's run, continued when recorded for this config; its files
    under `<storage>/<run>/wandb` (uploaded there when the block ends, with `storage` in an object store)."""
    wandb = _import("wandb", "wandb")
    section = cfg.tracking.wandb
    key = str(section.project)
    run_id = _known(cfg, "wandb", key, name, digest) or uuid.uuid4().hex[:8]
    _remember(cfg, "wandb", key, name, {"run_id": run_id, "config_hash": digest})
    with storage.writing(storage.join(cfg.storage, cfg.run)) as root:
        run = wandb.init(project=section.project, group=cfg.run, name=name, job_type=name, id=run_id,
                         resume="allow", mode=section.mode, dir=str(root), config=params, reinit="create_new",
                         tags=[v[:64] for v in _tags(cfg, name, digest).values()],
                         # The driver's own CPU and memory say nothing of the stage's workers: no system stats.
                         settings=wandb.Settings(console="off", silent=True, save_code=False, x_disable_stats=True,
                                                 x_disable_machine_info=True, x_save_requirements=False,
                                                 disable_job_creation=True))
        try:
            yield run
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish()


@contextlib.contextmanager
def _wandb_stage(cfg: PipelineConfig, name: str, params: dict[str, Any], digest: str) -> Iterator[Finish]:
    with _wandb_run(cfg, name, params, digest) as run:

        def finish(result: StageResult) -> None:
            # The workers write `metrics.jsonl`; W&B gets its steps here, from the driver, once the stage ends.
            for record in _records(storage.join(cfg.stage_dir(name), "metrics.jsonl")):
                run.log({k: v for k, v in numbers(record).items() if k != "step"}, step=int(record["step"]))
            run.summary.update({**numbers(result.metrics), "stage_seconds": result.seconds})
            for path, folder in _artifacts(cfg.stage_dir(name), ARTIFACTS):
                _copy_into(run, path, folder)

        yield finish


def _copy_into(run: Any, path: Path, folder: str) -> None:
    """A copy (not `run.save`'s symlink: a rerun may move the stage folder aside) in the run's files, which W&B
    keeps with the run when it finishes."""
    target = Path(run.dir) / folder / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)


def _records(uri: str) -> list[dict[str, Any]]:
    try:
        lines = storage.read_text(uri).splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line torn by a kill
            record = json.loads(line)
            if isinstance(record, dict) and "step" in record:
                out.append(record)
    return out


# -- the hooks --------------------------------------------------------------------------------------------------


def tracked(cfg: PipelineConfig, stage: Stage, call: Callable[[], StageResult]) -> StageResult:
    """Run `call()` (the stage) inside its tracking runs; `call()` alone when tracking is off."""
    track = cfg.tracking
    if not track.enabled and not track.tensorboard:
        return call()
    params, digest = stage_params(cfg, stage) if track.enabled else ({}, "")
    _sinks.clear()
    try:
        with contextlib.ExitStack() as stack:
            finishers: list[Finish] = []
            if track.mlflow.uri:
                finishers.append(stack.enter_context(_mlflow_stage(cfg, stage, params, digest)))
            if track.wandb.project and track.wandb.mode != "disabled":
                finishers.append(stack.enter_context(_wandb_stage(cfg, stage.name, params, digest)))
            if track.tensorboard:
                _sinks["tensorboard"] = True
            result = call()
            for finish in finishers:
                finish(result)
            return result
    finally:
        _sinks.clear()


@contextlib.contextmanager
def pipeline_run(cfg: PipelineConfig) -> Iterator[None]:
    """`llmray run`: the parent run every stage's run nests under; `report.html` logged when it ends."""
    if not cfg.tracking.enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        parent = stack.enter_context(_mlflow_parent(cfg)) if cfg.tracking.mlflow.uri else None
        yield
        report = stack.enter_context(_local_copy(storage.join(cfg.storage, cfg.run, "report.html")))
        if report is None:
            return
        if parent is not None:
            _import("mlflow", "mlflow").log_artifact(str(report))
        if cfg.tracking.wandb.project and cfg.tracking.wandb.mode != "disabled":
            with _wandb_run(cfg, "pipeline", {}, None) as run:
                _copy_into(run, report, "")


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[Path | None]:
    """A local path of one file (a temporary copy from an object store); None when it is not there."""
    with tempfile.TemporaryDirectory(prefix="llmray-track-") as tmp:
        yield storage.file_here(uri, tmp)
