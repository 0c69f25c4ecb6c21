"""One sweep trial: a Tune function trainable that fits a `TorchTrainer` running the one loop.

Ray Train V2's pattern for Tune: the trial's driver builds the trainer and forwards the workers' reports
to Tune with `TuneReportCallback`. Every report carries the loop's own `step`, which ASHA schedules on.
Each trial writes under `<sweep>/trials/<trial_id>/`: `metrics.jsonl` (rank 0, every step), the Ray Train
run `train/` with its checkpoint, and `trial.json` (the values it ran).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llm.tune.space import train_overrides

TRIALS_DIR = "trials"
PG_FILE = "placement_group.json"


def trial_worker(config: dict[str, Any]) -> None:
    """The one loop, after rank 0 notes its worker group's placement group in the trial folder.

    Ray Train's own cleaner removes a dead controller's placement group only through the State API (the
    dashboard); without it, a trial that ASHA stops leaves its workers' group reserved until the job
    ends. The sweep's driver removes it by this id when the trial ends (`release_trial`).
    """
    import ray.train
    from ray.util import get_current_placement_group

    from llm.train.loop import train_loop_per_worker

    pg = get_current_placement_group()
    if pg is not None and ray.train.get_context().get_world_rank() == 0 and config.get("out_dir"):
        (Path(config["out_dir"]) / PG_FILE).write_text(json.dumps({"id": pg.id.hex()}))
    train_loop_per_worker(config)


def release_trial(folder: Path) -> bool:
    """Remove the trial's worker placement group if it is still there; True when one was removed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    try:
        pg_id = json.loads((folder / PG_FILE).read_text())["id"]
    except (OSError, ValueError, KeyError):
        return False
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
    if not ray.is_initialized() or placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


def trial_spec(base: dict[str, Any], values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The loop's plain-dict spec for one trial: the target stage's, with the trial's schedule."""
    train = {**base["train"], **train_overrides(values, int(base["train"]["max_steps"]))}
    return {**base, "train": train, "out_dir": str(folder), "export": False}


def run_trial(config: dict[str, Any], base: dict[str, Any], scaling: dict[str, Any], root: str) -> None:
    """Tune's function trainable. `base` is the target stage's `LoopSpec` dict for a sweep trial."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    folder = Path(root) / trial_id
    # No Tune checkpoint: a trial cut off by an interruption starts over, and its half-written files
    # would mix two runs in one metrics.jsonl.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec = trial_spec(base, config, folder)
    (folder / "trial.json").write_text(json.dumps({"trial_id": trial_id, "values": config,
                                                   "train": spec["train"]}, indent=2, default=str))
    trainer = TorchTrainer(
        trial_worker,
        train_loop_config=spec,
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(folder),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            # A failed trial is an error of the sweep; retrying inside it would skew its wall time.
            failure_config=ray.train.FailureConfig(max_failures=0),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a V2 UserCallback
        ),
    )
    trainer.fit()
