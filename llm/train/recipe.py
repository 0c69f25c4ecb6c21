"""The one training recipe: what pretrain, finetune, a sweep trial and distillation share.

A training stage reads `lr: best` (`best_schedule`), builds its `LoopSpec` (model source, data, hooks: the
part that differs), then `fit` runs it: the DeepSpeed config checked on the driver, the newest whole
checkpoint under `<folder>/ray` chosen to resume from, the loop on Ray Train (or in this process with
`sizing.workers: 0`); `summary` and `print_summary` turn its `metrics.jsonl` into the manifest's metrics
and the closing console line. Export is the loop's (`LoopSpec.export_hook`); what a stage does after
(finetune's merge and evaluation) is its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from llm import storage, tracking
from llm.config import LLM_PREFIX, PipelineConfig
from llm.sizing import planned
from llm.train import ds_config
from llm.train.best_lr import apply_best, describe
from llm.train.fit import TrainJob, fit_with_ray, resume_point
from llm.train.loop import run_loop
from llm.train.metrics import read_records, training_summary
from llm.train.runtime import LocalRuntime
from llm.train.spec import LoopSpec

RAY_DIR = "ray"
"""`<stage>/ray/attempt-<n>/`: one Ray Train run per start of the stage, holding its checkpoints."""


def best_schedule(cfg: PipelineConfig, stage: str) -> tuple[PipelineConfig, dict[str, Any] | None]:
    """`cfg` with `<stage>.lr: best` standing for the sweep's winner (said on the console), and where it came
    from (None when the stage names its own schedule): the stage's hash covers that schedule, not `best`."""
    cfg, lr_from = apply_best(cfg, stage)
    if lr_from is not None:
        print(f"{stage}: {describe(lr_from)}", flush=True)
    return cfg, lr_from


def job(cfg: PipelineConfig, stage: str) -> TrainJob:
    """The training job of a stage section (`pretrain` or `finetune`) as `llmray plan` sized it."""
    return TrainJob(stage, stage, getattr(cfg, stage), getattr(planned(cfg), stage))


def to_store(spec: LoopSpec, folder: storage.Folder) -> LoopSpec:
    """With `folder` in an object store, the workers write on their own nodes and upload there
    (`llm.train.worker`); on a disk they write into it and the spec stays as it is."""
    if folder.on_disk:
        return spec
    local = storage.cache_dir() / "out" / hashlib.sha256(folder.uri.encode()).hexdigest()[:16]
    return replace(spec, out_dir=str(local), upload_to=folder.uri)


def fit(cfg: PipelineConfig, job: TrainJob, spec: LoopSpec, folder: storage.Folder) -> dict[str, Any]:
    """Run (or resume from the newest whole checkpoint under `<folder>/ray`) the one loop; returns the last
    metrics. With `sizing.workers: 0`, in this process without Ray (a local `storage` only)."""
    ds_config.build(job.train, max(1, job.sizing.workers), job.section)  # a bad `deepspeed:` fails before workers
    root = folder.path(RAY_DIR)
    spec.resume_from = resume_point(root, job.train.keep_checkpoints, job.name)
    spec.tracking = tracking.worker_sinks()  # rank 0 logs its steps into the stage's tracked run
    if job.sizing.workers < 1:
        folder.require_disk(f"{LLM_PREFIX}.{job.name}.sizing.workers: 0 trains without Ray and needs a local "
                            f"`storage` (got {cfg.storage})")
        return run_loop(spec, LocalRuntime(checkpoint_root=root, keep=job.train.keep_checkpoints))
    return fit_with_ray(cfg, job, spec, root)


def summary(folder: storage.Folder, metrics: dict[str, Any], lr_from: dict[str, Any] | None) -> dict[str, Any]:
    """The stage's manifest metrics from the `metrics.jsonl` rank 0 wrote into `folder`; with `lr_from`, the
    sweep (and trial) the schedule came from."""
    out = training_summary(read_records(folder.path("metrics.jsonl")), metrics)
    if lr_from is not None:
        out["lr_from"] = lr_from
    return out


def print_summary(head: str, metrics: dict[str, Any], folder: storage.Folder, outputs: dict[str, str],
                  with_val: bool = True) -> None:
    """`<head>, loss a -> b, val loss c (perplexity d)` and where the outputs are (label -> path inside)."""
    line = head
    if metrics["first_loss"] is not None:
        line += f", loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}"
    if with_val and metrics["val_ppl"] is not None:
        line += f", val loss {metrics['val_loss']:.4f} (perplexity {metrics['val_ppl']:.1f})"
    print(line + "".join(f"\n  {label}: {folder.path(rel)}" for label, rel in outputs.items()), flush=True)


def inputs_with_sweep(inputs: tuple[str, ...], lr_from: dict[str, Any] | None) -> tuple[str, ...]:
    """A stage's inputs, and the sweep when its schedule came from there (its manifest hash is recorded)."""
    return (*inputs, "sweep") if lr_from is not None else inputs
