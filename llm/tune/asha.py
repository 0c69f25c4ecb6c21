"""ASHA that keeps its rungs when Tune restores an interrupted sweep.

Tune saves the searcher's state with the experiment but not the scheduler's: a restored sweep's ASHA starts
with empty rungs, so the first trial to reach each rung after an interruption always goes on, and a
continued sweep stops fewer trials than one left alone. Tune re-adds every restored trial, ended ones
included; for an ended trial this replays the validation losses its own `metrics.jsonl` recorded (the values
ASHA saw in its reports) into the rungs, as ASHA recorded them the first time. `trials_dir` is a local
folder or a store URI (a sweep in an object store: rank 0 uploaded the records before each report).
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from llm import storage
from llm.train.metrics import read_records
from llm.tune.space import METRIC, TIME_ATTR


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
        for rec in sorted((r for r in records if r.get(METRIC) is not None), key=lambda r: r[TIME_ATTR]):
            bracket.on_result(trial, rec[TIME_ATTR], op * float(rec[METRIC]))

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """Each rung's milestone and the (signed) values recorded at it, for inspection."""
        return [(milestone, dict(recorded)) for b in self._brackets for milestone, recorded in b._rungs]
