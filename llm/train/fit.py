"""Running the one loop on Ray Train for any training stage: reserve the planned workers, build the
`TorchTrainer`, fit, and turn a worker's failure into one line with the full trace in a log file."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm import console, storage
from llm.config import PipelineConfig, TrainConfig
from llm.console import LiveLine
from llm.errors import ConfigError, LLMRayError, TrainingError
from llm.raycluster import connect, reserve
from llm.sizing import TrainSizing
from llm.train import checkpoint as ckpt
from llm.train.loop import Start, deepspeed_config
from llm.train.metrics import progress_line
from llm.train.spec import LoopSpec
from llm.train.worker import train_loop_per_worker


@dataclass(frozen=True)
class TrainJob:
    """What a stage trains with, beside its `LoopSpec`: its name, its training section and its planned workers."""

    name: str
    """The stage (`pretrain`, `finetune`, `compress`): console lines, the log file, `<name>.sizing.workers`."""
    section: str
    """The config section of the training fields, for errors (`pretrain`, `compress.distill`)."""
    train: TrainConfig
    """The stage's section (`keep_checkpoints`, `max_failures`, `deepspeed` are read from it)."""
    sizing: TrainSizing
    """The stage's planned sizing (`llm.sizing.planned`): workers and their resources."""


def build_trainer(spec: LoopSpec, scaling: dict[str, Any], root: str, keep_checkpoints: int,
                  max_failures: int, name: str | None = None) -> Any:
    """The `TorchTrainer` that runs the one loop, its run folder `<root>/<name>` (a new attempt each call
    by default: resume is chosen by the stage from verified checkpoints, not by Ray Train's restore).
    Checkpoints go to `root` (a path or a store URI) from every worker, through Ray Train."""
    import ray.train
    from ray.train.torch import TorchTrainer

    name = name or f"attempt-{1 + sum(1 for a in storage.subfolders(root) if a.startswith('attempt-'))}"
    storage_path, filesystem = storage.ray_storage(root)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.to_dict(),
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def fit_with_ray(cfg: PipelineConfig, job: TrainJob, spec: LoopSpec, root: str) -> dict[str, Any]:
    """Reserve the planned workers (the autoscaler starts nodes), fit, prune old checkpoints under `root`."""
    _check_resume(spec, job.sizing.workers, job.name)
    connect(cfg)
    reserve(job.sizing, cfg.ray.resource_timeout_s, job.name)
    keep = job.train.keep_checkpoints
    trainer = build_trainer(spec, job.sizing.scaling_config_kwargs(), root, keep, job.train.max_failures)
    metrics = Path(spec.out_dir or root) / "metrics.jsonl"
    if spec.upload_to:  # rank 0's own folder; seen live when rank 0 runs on the driver's node
        metrics = Path(str(spec.out_dir)) / "rank0" / "metrics.jsonl"
    try:
        with LiveLine(lambda: progress_line(metrics, spec.train.max_steps, spec.stage)):
            result = trainer.fit()
    except Exception as e:  # Ray Train wraps worker errors; the user gets one line and a log file
        raise worker_error(e, console.log_path(cfg, job.name), job.name) from None
    ckpt.prune(root, keep)
    return dict(result.metrics or {})


def _check_resume(spec: LoopSpec, workers: int, stage: str) -> None:
    """A resume on another worker count whose micro batch x workers does not divide the checkpoint's
    global batch fails here, in one line naming the keys, before any worker starts."""
    if spec.resume_from:
        start = Start(spec.resume_from, ckpt.read_state(spec.resume_from))
        deepspeed_config(spec.train, max(1, workers), stage, start)


def resume_point(root: str, keep: int, stage: str) -> str | None:
    """The newest whole checkpoint under `root` to resume from; damaged ones are named, set aside, passed
    over; with none left the run starts over and says so."""
    choice = ckpt.choose(root, set_aside=True)
    for aside, problem in choice.damaged:
        print(f"{stage}: damaged checkpoint {aside}: {problem}; set aside", flush=True)
    if choice.path:
        print(f"{stage}: resuming from step {choice.step} ({choice.path})", flush=True)
        ckpt.prune(root, keep)
    elif choice.damaged:
        print(f"{stage}: no whole checkpoint left; starting over from step 0", flush=True)
    return choice.path


def _causes(e: BaseException) -> list[BaseException]:
    """The exception, the workers' exceptions Ray Train collected, and their causes."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or any(cur is s for s in seen):
            continue
        seen.append(cur)
        todo += list(getattr(cur, "worker_failures", {}).values())
        todo += [getattr(cur, "cause", None), getattr(cur, "controller_failure", None), cur.__cause__]
    return seen


def worker_error(e: BaseException, log: Path, stage: str) -> LLMRayError:
    """The one-line error for a failed fit; the full trace goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write("".join(traceback.format_exception(e)))
    causes = _causes(e)
    for cause in causes:
        if isinstance(cause, TrainingError):
            return TrainingError(str(cause), str(log))
        if isinstance(cause, LLMRayError):  # keeps its type (and exit code): a ConfigError stays one
            return type(cause)(f"{cause} (full trace: {log})")
    root = causes[-1]
    lines = [ln for ln in str(root).strip().splitlines() if ln.strip()]
    message = lines[-1] if lines else type(root).__name__
    return TrainingError(f"{stage}: training failed in a worker: {message[:300]}", str(log))


def outside_run(cfg: PipelineConfig, path: str, key: str) -> str | None:
    """The one-line warning for an `init_from` outside `<storage>/<run>/`, else None.

    A checkpoint is unpickled by DeepSpeed on every worker: whoever can write it runs code there, so a
    path outside the run's own storage is a second place that must be trusted.
    """
    run = cfg.storage.rstrip("/") + "/" + cfg.run
    if storage.within(path, run):
        return None
    return (f"warning: {key}={path} is outside this run's storage ({run}); its checkpoints are unpickled on "
            f"every worker, so whoever can write there can run code on the cluster")


def resolve_init(path: str, key: str) -> tuple[str, str]:
    """(`checkpoint` | `model`, path) of an `init_from` value, or a one-line error naming `key`.

    A stage folder gives its newest whole checkpoint (else its exported `model/`); a checkpoint folder
    is used as is (after verification); a Hugging Face model directory gives weights only.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if (p / "loop_state.json").exists():
        problem = ckpt.verify(p)
        if problem:
            raise ConfigError(f"{key}: checkpoint {path} is damaged: {problem}")
        return "checkpoint", str(p)
    for root in (p / "ray", p):
        choice = ckpt.choose(root)
        if choice.path:
            return "checkpoint", choice.path
    for model in (p / "model", p):
        if (model / "config.json").exists() and (any(model.glob("*.safetensors")) or any(model.glob("*.bin"))):
            return "model", str(model)
    raise ConfigError(f"{key}: {path} holds no whole checkpoint and no Hugging Face model (config.json + weights)")
