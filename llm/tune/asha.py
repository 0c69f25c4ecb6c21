"""ASHA that keeps its rungs when Tune restores an interrupted sweep.

Tune saves the searcher's state with the experiment but not the scheduler's: a restored sweep's ASHA starts
with empty rungs, so the first trial to reach each rung after an interruption always goes on, and a
continued sweep stops fewer trials than one left alone. Tune re-adds every restored trial, ended ones
included; for an ended trial this replays the validation losses its own `metrics.jsonl` recorded (the values
ASHA saw in its reports) into the rungs, as ASHA recorded them the first time. `trials_dir` is a local
folder or a store URI (a sweep in an object store: rank 0 uploaded the records before each report).

The class subclasses Ray's, and importing this module must not import Ray (`import llm.cli` stays light):
it is made on first use, and `llm.tune.asha.ResumableASHA` names it (so Tune's pickle of the experiment
refers to it by name, as to any class).
"""

from __future__ import annotations

import functools
from typing import Any

from llm import storage
from llm.train.metrics import read_records


def resumable_asha(trials_dir: str, **kwargs: Any) -> Any:
    """A `ResumableASHA` replaying ended trials' records from `trials_dir`; `kwargs` are `ASHAScheduler`'s."""
    return _resumable_asha()(trials_dir, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "ResumableASHA":
        return _resumable_asha()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _resumable_asha() -> type:
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def __init__(self, trials_dir: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.trials_dir = trials_dir

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            super().on_trial_add(tune_controller, trial)
            if trial.status not in (Trial.TERMINATED, Trial.ERROR):
                return
            bracket = self._trial_info.pop(trial.trial_id)  # an ended trial never reports again
            records = read_records(storage.join(self.trials_dir, trial.trial_id, "metrics.jsonl"))
            op = self._metric_op  # +1 (max) or -1 (min): set from the Tuner's mode before any trial is added
            if op is None:
                raise RuntimeError("ResumableASHA: the metric's mode is not set")
            metric, time_attr = self._metric, self._time_attr
            if metric is None:
                raise RuntimeError("ResumableASHA: the metric is not set")
            for rec in sorted((r for r in records if r.get(metric) is not None), key=lambda r: r[time_attr]):
                bracket.on_result(trial, rec[time_attr], op * float(rec[metric]))

        def rungs(self) -> list[tuple[float, dict[str, float]]]:
            """Each rung's milestone and the (signed) values recorded at it, for inspection."""
            return [(milestone, dict(recorded)) for b in self._brackets for milestone, recorded in b._rungs]

    ResumableASHA.__qualname__ = "ResumableASHA"
    return ResumableASHA
