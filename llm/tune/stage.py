"""The sweep stage: Ray Tune over learning-rate schedules, every trial a Ray Train run of the one loop.

Writes under `<storage>/<run>/sweep/`: `tune/` (Tune's experiment: its state makes an interrupted sweep
resumable), `trials/<trial_id>/` (each trial's metrics and Ray Train run), `trials.csv`, `best.json`,
`curves.png`, then the manifest. A rerun after an interruption restores Tune's experiment: finished
trials are kept, not run again; trials cut off mid-run start over.

With `storage` in an object store the same layout lives in the bucket: Tune's experiment is stored there
(`storage_path` + `storage_filesystem`), so an interrupted sweep is restored from the bucket; each trial
writes its folder there (see `llm.tune.trial`); trials.csv, best.json and curves.png are written to the
stage's staging folder and uploaded by the stage contract before the manifest.
"""

from __future__ import annotations

import json
import time
from typing import Any

from llm import storage, tracking
from llm.config import LLM_PREFIX, PipelineConfig, ScheduleConfig, SweepConfig
from llm.console import LiveLine, log_path
from llm.errors import ConfigError, TrainingError
from llm.raycluster import connect
from llm.sizing import planned
from llm.stage import Stage, StageResult, execute, stage_input
from llm.train import ds_config, finetune, pretrain
from llm.train.best_lr import BEST
from llm.train.fit import worker_error
from llm.train.spec import LoopSpec
from llm.tune import space
from llm.tune.best import best_record
from llm.tune.progress import CURRENT, Progress, progress_callback
from llm.tune.results import TrialRow, choose_best, plot_curves, summary_table, trial_rows, write_csv
from llm.tune.trial import TRIALS_DIR, run_trial

TUNE_DIR = "tune"
DRIVER_CPU = 0.01


def trial_config(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with the target stage set up as a trial runs it: the sweep's steps and evaluation cadence,
    a checkpoint only at the end, and a placeholder schedule (each trial sets its own). Hashing this,
    not the target section as written, means `lr: best` in the target never reruns the sweep."""
    sweep = cfg.sweep
    section = getattr(cfg, sweep.target)
    update = {"max_steps": sweep.max_steps, "eval_every": sweep.eval_every, "log_every": sweep.eval_every,
              "eval_batches": sweep.eval_batches, "checkpoint_every": sweep.max_steps, "lr": ScheduleConfig()}
    return cfg.model_copy(update={sweep.target: section.model_copy(update=update)})


def base_spec(cfg: PipelineConfig, folder: storage.Folder) -> LoopSpec:
    """The target stage's `LoopSpec` that every trial starts from."""
    if cfg.sweep.target == "pretrain":
        return pretrain.loop_spec(cfg, folder, stage_input(cfg, "data"))
    return finetune.sweep_spec(cfg, folder)


def trials_dir(folder: storage.Folder) -> str:
    """Where the trials' folders are: `<sweep>/trials` (in the store when the stage's folder is there)."""
    return folder.path(TRIALS_DIR)


def _tuner(cfg: PipelineConfig, folder: storage.Folder, base: LoopSpec) -> tuple[Any, bool]:
    """A new Tuner, or the interrupted one restored from `<folder>/tune` (finished trials kept); Tune's
    experiment is stored (and restored) where the stage's folder is, a bucket included."""
    from ray import tune

    sweep = cfg.sweep
    sizing = planned(cfg)
    if sizing.sweep_trial.workers < 1:
        raise ConfigError(f"{LLM_PREFIX}.sweep.sizing.workers: a trial needs at least one Ray Train worker")
    trainable = tune.with_parameters(run_trial, base=base, scaling=sizing.sweep_trial.scaling_config_kwargs(),
                                     root=trials_dir(folder))
    # The trial's driver only waits on Ray Train's controller (itself a 0-CPU actor), so it holds a token
    # CPU share (Tune refuses an empty request): the CPUs go to trial workers, and concurrency is capped
    # by `max_concurrent_trials` (derived from the sizing) rather than by the drivers' reservations.
    trainable = tune.with_resources(trainable, {"CPU": DRIVER_CPU})
    storage_path, filesystem = folder.ray_storage()
    experiment = storage.join(storage_path, TUNE_DIR)
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, param_space=space.param_space(sweep),
                                  storage_filesystem=filesystem), True
    return tune.Tuner(
        trainable,
        param_space=space.param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=space.METRIC, mode=space.MODE, search_alg=space.searcher(sweep, sizing.sweep_concurrent_trials),
            scheduler=space.scheduler(sweep, trials_dir(folder)),
            num_samples=sweep.num_trials if sweep.search != "grid" else 1,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage_path, storage_filesystem=filesystem,
                                  verbose=0, callbacks=[progress_callback(trials_dir(folder))]),
    ), False


def _fit(tuner: Any, progress: Progress) -> tuple[Any, float]:
    """Tune's fit under the live line; the grid and its wall time."""
    t0 = time.perf_counter()
    CURRENT.append(progress)
    try:
        with LiveLine(progress.line):
            grid = tuner.fit()
    finally:
        CURRENT.remove(progress)
    return grid, time.perf_counter() - t0


def sweep(cfg: PipelineConfig, folder: storage.Folder, interrupt_after: int | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep into `folder`; write trials.csv, best.json, curves.png; return metrics."""
    sweep_cfg = cfg.sweep
    ds_config.build(getattr(cfg, sweep_cfg.target), 1)  # a bad `<target>.deepspeed` fails here, before any trial
    base = base_spec(cfg, folder)
    base.tracking = tracking.worker_sinks()  # each trial nests its own run under the sweep's (`run_trial`)
    connect(cfg)
    planned_n = space.planned_trials(sweep_cfg)
    progress = Progress(planned_n, sweep_cfg.max_steps, interrupt_after)
    tuner, restored = _tuner(cfg, folder, base)
    # Trials an earlier, interrupted run finished (the restored state), then this run's: Tune marks the
    # trials it cut off at an interruption as terminated too, so only the callbacks tell them apart.
    before = tuner.get_results() if restored else None
    progress.done_before = (before.num_terminated + before.num_errors) if before is not None else 0
    if restored:
        print(f"sweep: continuing the interrupted sweep in {folder.path(TUNE_DIR)} "
              f"({progress.done_before} finished trials are kept)", flush=True)
    grid, wall = _fit(tuner, progress)
    done = progress.done_before + progress.done
    if done < planned_n:
        raise TrainingError(f"sweep: interrupted with {done} of {planned_n} trials done; rerun `llmray sweep` "
                            "to continue (finished trials are not run again)")
    rows = trial_rows(grid, trials_dir(folder), sweep_cfg.max_steps)
    best = _best(cfg, grid, rows)
    write_record(folder, rows, best, sweep_cfg)
    tracking.end_trials(base.tracking, {r.trial_id: (r.status, {
        "steps": r.steps, "final_val_loss": r.final_val_loss, "best_val_loss": r.best_val_loss,
        "trial_seconds": r.wall_s}) for r in rows}, best.trial_id)
    stopped, failed = sum(r.stopped_early for r in rows), sum(r.status == "error" for r in rows)
    log = log_path(cfg, "sweep")
    print(f"sweep: {len(rows)} trials ({stopped} stopped early by {sweep_cfg.scheduler}, {failed} failed) in "
          f"{wall:.0f}s; best {best.kind} peak {best.peak:.2e}: val loss {best.final_val_loss:.4f}"
          f"{f' (failed trials: {log})' if failed else ''}\n{summary_table(rows, best)}\n"
          f"  trials: {folder.path('trials.csv')}\n  best: {folder.path(BEST)}\n"
          f"  curves: {folder.path('curves.png')}", flush=True)
    return {"trials": len(rows), "stopped_early": stopped, "failed": failed,
            "steps_spent": sum(r.steps for r in rows), "trial_seconds": round(sum(r.wall_s for r in rows), 3),
            "sweep_seconds": round(wall, 3), "concurrent_trials": tuner_concurrency(cfg),
            "best_trial": best.trial_id, "best_val_loss": best.final_val_loss, "resumed": restored}


def _best(cfg: PipelineConfig, grid: Any, rows: list[TrialRow]) -> TrialRow:
    """The winning trial; each failed trial's trace goes to the log, and no winner is one line naming it."""
    log = log_path(cfg, "sweep")
    for result in grid:
        if result.error is not None:
            worker_error(result.error, log, "sweep")
    best = choose_best(rows)
    if best is None:
        raise worker_error(grid.errors[0], log, "sweep") if grid.errors else \
            TrainingError("sweep: no trial reported a validation loss (is data.val_fraction 0?)")
    return best


def write_record(folder: storage.Folder, rows: list[TrialRow], best: TrialRow, sweep_cfg: SweepConfig) -> None:
    """`trials.csv`, `best.json` and `curves.png` into the stage's folder (with `storage` in an object store,
    the staging side the stage contract uploads before the manifest)."""
    write_csv(rows, folder.local / "trials.csv")
    folder.write_text(BEST, json.dumps(best_record(best, sweep_cfg.target, sweep_cfg.max_steps, len(rows)),
                                       indent=2) + "\n")
    plot_curves(rows, best, folder.local / "curves.png")


def tuner_concurrency(cfg: PipelineConfig) -> int:
    return planned(cfg).sweep_concurrent_trials


def run(cfg: PipelineConfig, force: bool = False, interrupt_after: int | None = None) -> StageResult:
    """Sweep stage: skip if done, else run (or continue) the sweep and commit.

    Args:
        cfg: the pipeline config.
        force: start over even when a finished or interrupted sweep exists (the old folder is kept aside).
        interrupt_after: testing hook: interrupt the sweep (as Ctrl-C does) once this many trials ended.
    """
    tcfg = trial_config(cfg)
    inputs = finetune.inputs_of(cfg) if cfg.sweep.target == "finetune" else ("data",)
    return execute(tcfg, STAGE, lambda folder: sweep(tcfg, folder, interrupt_after), inputs=inputs, force=force)


def progress(folder: str) -> str:
    """For `llmray status`: trials started (each writes `trials/<id>/trial.json` first); whether Tune saved
    the experiment a rerun restores (`tune/tuner.pkl`, what `Tuner.can_restore` looks for)."""
    started = sum(1 for rel in storage.list_files(storage.join(folder, TRIALS_DIR))
                  if rel.count("/") == 1 and rel.endswith("/trial.json"))
    if storage.size(storage.join(folder, "tune", "tuner.pkl")) is None:
        return f"{started} trials started; Tune saved no experiment yet, a rerun starts the sweep over"
    return f"{started} trials started; a rerun continues the sweep (ended trials are kept)"


STAGE = Stage("sweep", "learning-rate schedules (Ray Tune over Ray Train runs)", run,
              sections=lambda cfg: ("sweep", cfg.sweep.target), inputs=("data", "pretrain"), resumable=True,
              as_run=trial_config, progress=progress)
