"""The tracking section: where runs are recorded besides the stage folders (MLflow, W&B, TensorBoard)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llm.config.base import Section


class MlflowConfig(Section):
    """MLflow: a parent run per pipeline run (`run`), a nested run per stage."""

    uri: str | None = None
    """Tracking URI (`http://host:5000`, `sqlite:///mlflow.db`, a `file:` folder); None: MLflow is off."""
    experiment: str = "llmray"
    """Experiment the runs are recorded under (created when missing)."""


class WandbConfig(Section):
    """Weights & Biases: a run per stage, grouped by the pipeline's `run` name."""

    project: str | None = None
    """W&B project; None: W&B is off."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """`offline` writes run files under `<storage>/<run>/wandb` (`wandb sync` uploads them later); `online`
    needs a login on the driver."""


class TrackingConfig(Section):
    """Experiment tracking of every stage: params (the stage's hashed config), tags, summary metrics,
    per-step training metrics and artifacts. All off by default; none of it changes a stage's outputs."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """MLflow tracking (on when `uri` is set)."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """W&B tracking (on when `project` is set)."""
    tensorboard: bool = False
    """TensorBoard event files of every training stage under `<stage>/tensorboard` (the per-stage
    `tensorboard` key does the same for one stage)."""

    @property
    def enabled(self) -> bool:
        """Any of MLflow and W&B is on (TensorBoard is written by the training workers alone)."""
        return bool(self.mlflow.uri) or (bool(self.wandb.project) and self.wandb.mode != "disabled")
