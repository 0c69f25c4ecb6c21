"""The sweep's live line and the Tune callback that feeds it (and frees an ended trial's placement group).

The callback subclasses Ray's, and importing this module must not import Ray (`import llm.cli` stays light):
the class is made on first use and `llm.tune.progress.ProgressCallback` names it (Tune pickles its callbacks
with the experiment; a restored Tuner brings back those copies, which refer to the class by that name).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any

from llm import storage
from llm.tune.trial import release_trial


class Progress:
    """What the live line shows (and the tests' interruption hook), fed by the callback."""

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


CURRENT: list[Progress] = []
"""The running sweep's progress. Tune pickles its callbacks with the experiment and a restored Tuner
brings back those copies, so the callback looks the live object up here instead of holding it."""


def progress_callback(trials_dir: str) -> Any:
    """The Tune callback of a sweep whose trials' folders are under `trials_dir`."""
    return _progress_callback()(trials_dir)


def __getattr__(name: str) -> Any:
    if name == "ProgressCallback":
        return _progress_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _progress_callback() -> type:
    from ray.tune import Callback

    class ProgressCallback(Callback):
        """Feeds the live line; frees an ended trial's worker placement group (see `trial.release_trial`)."""

        def __init__(self, trials_dir: str) -> None:
            self.trials_dir = trials_dir

        def _ended(self, trial: Any, error: bool) -> None:
            release_trial(storage.join(self.trials_dir, trial.trial_id))
            if CURRENT:
                CURRENT[-1].finish(trial.trial_id, error=error)

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            if CURRENT:
                CURRENT[-1].result(trial.trial_id, result)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._ended(trial, error=False)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._ended(trial, error=True)

    ProgressCallback.__qualname__ = "ProgressCallback"
    return ProgressCallback
