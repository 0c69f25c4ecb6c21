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

    from llm.train.loop import train_loop_per_worker

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
        train_loop_per_worker,
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
