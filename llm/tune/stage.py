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

import os
import signal
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from llm import storage
from llm.config import LLM_PREFIX, PipelineConfig, ScheduleConfig, SweepConfig
from llm.errors import ConfigError, TrainingError
from llm.stage import Stage, StageResult, execute, input_dir, input_uri, target
from llm.tune import space
from llm.tune.best import BEST, best_record
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


def base_spec(cfg: PipelineConfig, folder: Path) -> dict[str, Any]:
    """The target stage's `LoopSpec` (as a dict) that every trial starts from."""
    if cfg.sweep.target == "pretrain":
        from llm.train.stage import loop_spec

        remote = storage.is_remote(cfg.stage_dir("data"))  # parquet read from the store, the tokenizer cached
        return loop_spec(cfg, folder, input_uri(cfg, "data") if remote else input_dir(cfg, "data")).to_dict()
    from llm.train.finetune import sweep_spec

    spec: dict[str, Any] = sweep_spec(cfg, folder).to_dict()
    return spec


class _Progress:
    """What the live line shows (and the tests' interruption hook), fed by `_ProgressCallback`."""

    def __init__(self, planned: int, max_steps: int, interrupt_after: int | None) -> None:
        self.planned, self.max_steps, self.interrupt_after = planned, max_steps, interrupt_after
        self.done = self.stopped = self.errors = self.done_before = 0
        self.best: float | None = None
        self.running: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        step = int(result.get("step", 0))
        self.running[trial_id] = step
        val = result.get("val_loss")
        if val is not None and step >= self.max_steps:
            self.best = val if self.best is None else min(self.best, val)

    def finish(self, trial_id: str, error: bool = False) -> None:
        step = self.running.pop(trial_id, 0)
        self.done += 1
        self.errors += int(error)
        self.stopped += int(not error and 0 < step < self.max_steps)
        if self.interrupt_after is not None and self.done == self.interrupt_after:
            # The same path as Ctrl-C: Tune saves its experiment state and returns early.
            os.kill(os.getpid(), signal.SIGUSR1)

    def line(self) -> str:
        best = f", best val loss {self.best:.4f}" if self.best is not None else ""
        running = ", ".join(f"{t[-5:]}@{s}" for t, s in sorted(self.running.items()))
        return (f"[sweep] {self.done_before + self.done}/{self.planned} trials done ({self.stopped} stopped "
                f"early, {self.errors} failed){best}; running: {running or '-'}; "
                f"{time.perf_counter() - self.t0:.0f}s")


_CURRENT: list[_Progress] = []
"""The running sweep's progress. Tune pickles its callbacks with the experiment and a restored Tuner
brings back those copies, so the callback looks the live object up here instead of holding it."""


class _ProgressCallback(Callback):
    """Feeds the live line; frees an ended trial's worker placement group (see `trial.release_trial`)."""

    def __init__(self, trials_dir: str) -> None:
        self.trials_dir = trials_dir

    def _ended(self, trial: Any, error: bool) -> None:
        from llm.tune.trial import release_trial

        release_trial(storage.join(self.trials_dir, trial.trial_id))
        if _CURRENT:
            _CURRENT[-1].finish(trial.trial_id, error=error)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        if _CURRENT:
            _CURRENT[-1].result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, error=True)


def trials_dir(folder: Path) -> str:
    """Where the trials' folders are: `<sweep>/trials`, in the store when the stage's folder is there."""
    store = target(folder)
    return storage.join(store, TRIALS_DIR) if storage.is_remote(store) else str(folder / TRIALS_DIR)


def _tuner(cfg: PipelineConfig, folder: Path, base: dict[str, Any]) -> tuple[Any, bool]:
    """A new Tuner, or the interrupted one restored from `<folder>/tune` (finished trials kept); with the
    stage in an object store, Tune's experiment is stored (and restored) there."""
    from ray import tune

    from llm.sizing import planned

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
    store = target(folder)
    storage_path, filesystem = storage.ray_storage(store) if storage.is_remote(store) else (str(folder), None)
    experiment = storage.join(storage_path, TUNE_DIR)
    callbacks: list[Callback] = [_ProgressCallback(trials_dir(folder))]
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
                                  verbose=0, callbacks=callbacks),
    ), False


def sweep(cfg: PipelineConfig, folder: Path, interrupt_after: int | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep into `folder`; write trials.csv, best.json, curves.png; return metrics."""

    from llm.console import LiveLine, log_path
    from llm.raycluster import connect
    from llm.train import ds_config
    from llm.train.fit import worker_error

    sweep_cfg = cfg.sweep
    ds_config.build(getattr(cfg, sweep_cfg.target), 1)  # a bad `<target>.deepspeed` fails here, before any trial
    base = base_spec(cfg, folder)
    connect(cfg)
    planned_n = space.planned_trials(sweep_cfg)
    progress = _Progress(planned_n, sweep_cfg.max_steps, interrupt_after)
    tuner, restored = _tuner(cfg, folder, base)
    # Trials an earlier, interrupted run finished (the restored state), then this run's: Tune marks the
    # trials it cut off at an interruption as terminated too, so only the callbacks tell them apart.
    before = tuner.get_results() if restored else None
    progress.done_before = (before.num_terminated + before.num_errors) if before is not None else 0
    if restored:
        print(f"sweep: continuing the interrupted sweep in {storage.join(target(folder), TUNE_DIR)} "
              f"({progress.done_before} finished trials are kept)",
              flush=True)
    t0 = time.perf_counter()
    _CURRENT.append(progress)
    try:
        with LiveLine(progress.line):
            grid = tuner.fit()
    finally:
        _CURRENT.remove(progress)
    wall = time.perf_counter() - t0
    done = progress.done_before + progress.done
    if done < planned_n:
        raise TrainingError(f"sweep: interrupted with {done} of {planned_n} trials done; rerun `llmray sweep` "
                            "to continue (finished trials are not run again)")
    rows = trial_rows(grid, trials_dir(folder), sweep_cfg.max_steps)
    log = log_path(cfg, "sweep")
    for result in grid:
        if result.error is not None:
            worker_error(result.error, log, "sweep")  # each failed trial's trace goes to the log
    best = choose_best(rows)
    if best is None:
        raise worker_error(grid.errors[0], log, "sweep") if grid.errors else \
            TrainingError("sweep: no trial reported a validation loss (is data.val_fraction 0?)")
    write_record(folder, rows, best, sweep_cfg)
    stopped = sum(r.stopped_early for r in rows)
    failed = sum(r.status == "error" for r in rows)
    out = target(folder)  # the staging folder's files are uploaded there by the stage contract
    print(f"sweep: {len(rows)} trials ({stopped} stopped early by {sweep_cfg.scheduler}, {failed} failed) in "
          f"{wall:.0f}s; best {best.kind} peak {best.peak:.2e}: val loss {best.final_val_loss:.4f}"
          f"{f' (failed trials: {log})' if failed else ''}\n{summary_table(rows, best)}\n"
          f"  trials: {storage.join(out, 'trials.csv')}\n  best: {storage.join(out, BEST)}\n"
          f"  curves: {storage.join(out, 'curves.png')}", flush=True)
    return {"trials": len(rows), "stopped_early": stopped, "failed": failed,
            "steps_spent": sum(r.steps for r in rows), "trial_seconds": round(sum(r.wall_s for r in rows), 3),
            "sweep_seconds": round(wall, 3), "concurrent_trials": tuner_concurrency(cfg),
            "best_trial": best.trial_id, "best_val_loss": best.final_val_loss, "resumed": restored}


def write_record(folder: Path, rows: list[TrialRow], best: TrialRow, sweep_cfg: SweepConfig) -> None:
    """`trials.csv`, `best.json` and `curves.png` into the stage's folder (with `storage` in an object store,
    the staging folder the stage contract uploads before the manifest)."""
    import json

    write_csv(rows, folder / "trials.csv")
    (folder / BEST).write_text(json.dumps(best_record(best, sweep_cfg.target, sweep_cfg.max_steps, len(rows)),
                                          indent=2) + "\n")
    plot_curves(rows, best, folder / "curves.png")


def tuner_concurrency(cfg: PipelineConfig) -> int:
    from llm.sizing import planned

    return planned(cfg).sweep_concurrent_trials


def run(cfg: PipelineConfig, force: bool = False, interrupt_after: int | None = None) -> StageResult:
    """Sweep stage: skip if done, else run (or continue) the sweep and commit.

    Args:
        cfg: the pipeline config.
        force: start over even when a finished or interrupted sweep exists (the old folder is kept aside).
        interrupt_after: testing hook: interrupt the sweep (as Ctrl-C does) once this many trials ended.
    """
    tcfg = trial_config(cfg)
    if cfg.sweep.target == "finetune":
        from llm.train.finetune import inputs_of

        inputs = inputs_of(cfg)
    else:
        inputs = ("data",)
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
