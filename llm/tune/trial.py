"""One sweep trial: a Tune function trainable that fits a `TorchTrainer` running the one loop.

Ray Train V2's pattern for Tune: the trial's driver builds the trainer and forwards the workers' reports
to Tune with `TuneReportCallback`. Every report carries the loop's own `step`, which ASHA schedules on.
Each trial writes under `<sweep>/trials/<trial_id>/`: `metrics.jsonl` (rank 0, every step), the Ray Train
run `train/` with its checkpoint, and `trial.json` (the values it ran).

With the sweep in an object store, `<sweep>/trials` is a store URI: the trial's driver writes `trial.json`
there, Ray Train's storage is `<trial>/train` in the store, and the workers write on their own nodes and
upload (`llm.train.worker`): rank 0 uploads `metrics.jsonl` before every report (ASHA may stop the
trial on hearing it, and a restored sweep replays ended trials' records from the store) and its placement
group file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from llm import storage, tracking
from llm.config import TrainConfig
from llm.train.recipe import to_store
from llm.train.spec import LoopSpec
from llm.train.worker import train_loop_per_worker
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

    folder = config.get("upload_to") or config.get("out_dir")
    pg = get_current_placement_group()
    if pg is not None and ray.train.get_context().get_world_rank() == 0 and folder:
        storage.write_text(storage.join(folder, PG_FILE), json.dumps({"id": pg.id.hex()}))
    train_loop_per_worker(config)


def release_trial(folder: str) -> bool:
    """Remove the trial's worker placement group if it is still there; True when one was removed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    try:
        pg_id = json.loads(storage.read_text(storage.join(folder, PG_FILE)))["id"]
    except (OSError, ValueError, KeyError):
        return False
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
    if not ray.is_initialized() or placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


def trial_spec(base: LoopSpec, values: dict[str, Any], folder: str) -> LoopSpec:
    """The loop's spec for one trial: the target stage's, with the trial's schedule, writing into `folder`
    (in an object store: in a node-local folder uploaded there, `metrics.jsonl` before every report)."""
    train = TrainConfig.model_validate({**base.train.model_dump(), **train_overrides(values, base.train.max_steps)})
    spec = replace(base, train=train, out_dir=storage.Folder(folder).uri, upload_to=None, export=False,
                   publish_each=True)
    return to_store(spec, storage.Folder(folder))


def run_trial(config: dict[str, Any], base: LoopSpec, scaling: dict[str, Any], root: str) -> None:
    """Tune's function trainable. `base` is the target stage's `LoopSpec` for a sweep trial, its `tracking`
    the sweep stage's sinks (`llm.tracking.trial_run` nests the trial's MLflow run under the sweep's)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    folder = storage.join(root, trial_id)
    # No Tune checkpoint: a trial cut off by an interruption starts over, and its half-written files
    # would mix two runs in one metrics.jsonl.
    storage.remove_tree(folder)
    spec = trial_spec(base, config, folder)
    storage.write_text(storage.join(folder, "trial.json"), json.dumps(
        {"trial_id": trial_id, "values": config, "train": spec.train.model_dump(mode="json")}, indent=2, default=str))
    storage_path, filesystem = storage.ray_storage(folder)
    with tracking.trial_run(base.tracking, trial_id, config) as sinks:  # rank 0 logs into the trial's own run
        _fit(replace(spec, tracking=sinks), scaling, storage_path, filesystem)


def _fit(spec: LoopSpec, scaling: dict[str, Any], storage_path: str, filesystem: Any) -> None:
    """The trial's Ray Train run, its reports forwarded to Tune."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        trial_worker,
        train_loop_config=spec.to_dict(),
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            # A failed trial is an error of the sweep; retrying inside it would skew its wall time.
            failure_config=ray.train.FailureConfig(max_failures=0),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a V2 UserCallback
        ),
    )
    trainer.fit()
