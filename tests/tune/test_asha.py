"""ASHA's rungs survive an interrupted sweep: Tune restores trials but not the scheduler, so the restored
scheduler replays the ended trials' own metrics into its rungs (without Ray: the scheduler alone)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from llm.config import SweepConfig
from llm.tune import space


def _ended(trials_dir: Path, trial_id: str, curve: dict[int, float]) -> SimpleNamespace:
    folder = trials_dir / trial_id
    folder.mkdir(parents=True)
    lines = [{"step": s, "loss": v + 0.1, **({"val_loss": v} if s % 4 == 0 else {})} for s, v in curve.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9')
    return SimpleNamespace(trial_id=trial_id, status=Trial.TERMINATED)


def _scheduler(trials_dir: Path):
    sched = space.scheduler(SweepConfig(enabled=True, max_steps=12, eval_every=2, grace_period=4, reduction_factor=2),
                            str(trials_dir))
    sched.set_search_properties(space.METRIC, space.MODE)
    return sched


def test_restored_asha_stops_a_new_trial_worse_than_the_ended_ones(tmp_path: Path) -> None:
    sched = _scheduler(tmp_path)
    for i, base in enumerate((5.0, 5.2)):  # two trials an interrupted run finished
        sched.on_trial_add(None, _ended(tmp_path, f"t{i}", {s: base - 0.01 * s for s in range(1, 13)}))
    rungs = dict(sched.rungs())
    assert rungs[4] == {"t0": -4.96, "t1": -5.16} and rungs[8] == {"t0": -4.92, "t1": -5.12}
    assert not sched._trial_info  # ended trials are not live trials of the scheduler

    worse, better = (SimpleNamespace(trial_id=t, status=Trial.PENDING) for t in ("new1", "new2"))
    for t in (worse, better):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, better, {"step": 4, "val_loss": 4.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, worse, {"step": 4, "val_loss": 5.5}) == TrialScheduler.STOP


def test_fresh_asha_lets_the_first_trial_at_a_rung_go_on(tmp_path: Path) -> None:
    """What the replay fixes: with empty rungs the same poor trial would have gone on."""
    sched = _scheduler(tmp_path)
    worse = SimpleNamespace(trial_id="new1", status=Trial.PENDING)
    sched.on_trial_add(None, worse)
    assert sched.on_trial_result(None, worse, {"step": 4, "val_loss": 5.5}) == TrialScheduler.CONTINUE


def test_no_scheduler_is_fifo(tmp_path: Path) -> None:
    from ray.tune.schedulers import FIFOScheduler

    fifo = SweepConfig(enabled=True, max_steps=12, eval_every=2, grace_period=4, scheduler="none")
    assert isinstance(space.scheduler(fifo, str(tmp_path)), FIFOScheduler)
