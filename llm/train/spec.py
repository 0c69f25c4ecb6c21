"""What the one loop needs for one fit, typed: a `LoopSpec` built by a stage on the driver, handed to every
worker (Ray Train's `train_loop_config` is `spec.to_dict()`: the typed config sections dumped by pydantic,
read back with `LoopSpec.from_dict`; the hooks travel as function references, which pickle by name)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from llm.config import ModelConfig, TrainConfig
from llm.train.data import COLUMN

ModelHook = Callable[[Any, "LoopSpec"], Any]
"""`hook(model, spec) -> model`, applied before `deepspeed.initialize` (LoRA, a teacher)."""
LossHook = Callable[["LoopSpec"], Callable[[Any, Any, dict[str, Any]], Any]]
"""`hook(spec) -> loss_fn(engine, outputs, batch) -> loss` (distillation)."""
ExportHook = Callable[[Any, "LoopSpec", Any], Any]
"""`hook(engine, spec, tokenizer)`, run by every rank instead of the full-model export (LoRA's adapter)."""


def train_fields(section: TrainConfig) -> TrainConfig:
    """A stage section's `TrainConfig` fields alone (a pretrain section without its `model`, a finetune
    section without its data and LoRA settings): what the loop reads."""
    return TrainConfig.model_validate(section.model_dump(include=set(TrainConfig.model_fields)))


@dataclass
class LoopSpec:
    """Everything the loop needs; crosses process boundaries as `to_dict()`."""

    train: TrainConfig
    """The training fields (`train_fields` of a stage section); `lr` is a schedule, never `best`."""
    model: ModelConfig
    """The model to build, or `path` to load."""
    vocab_size: int
    seq_len: int
    train_files: list[str] = field(default_factory=list)
    """Training parquet shards in their global order; each rank reads its own slice."""
    columns: list[str] = field(default_factory=lambda: [COLUMN])
    """Columns read: `input_ids` (packed, labels are the inputs) or `input_ids` + `labels` (padded per batch)."""
    pad_id: int | None = None
    """Set for variable-length rows: pad inputs with it (labels with -100, mask 0)."""
    tokenizer_dir: str | None = None
    """A path or store URI (each worker fetches a checked copy)."""
    out_dir: str | None = None
    """Where rank 0 writes metrics.jsonl, TensorBoard files and `model/` (the export)."""
    upload_to: str | None = None
    """Set when `out_dir` is node-local (the stage folder is in an object store): each rank writes under
    `out_dir/rank<r>` and uploads what it wrote here (`llm.train.worker`)."""
    publish_each: bool = False
    """Upload metrics.jsonl before every report, not only at checkpoints (a sweep trial: ASHA may stop it)."""
    stage: str = "pretrain"
    export: bool = True
    peak_flops: float | None = None
    """Per-device peak FLOP/s for MFU; default: datasheet on GPU, measured matmul peak on CPU."""
    val_files: list[str] = field(default_factory=list)
    """Held-out parquet shards. Evaluation reads its few batches straight from them with pyarrow."""
    resume_from: str | None = None
    """A whole checkpoint of this run chosen by the stage (after a restart of the stage itself)."""
    init_checkpoint: str | None = None
    """A checkpoint of an earlier run to continue from on purpose (`init_from`): weights, optimizer, step."""
    data_id: str = ""
    """Identity of the training data (its manifest hash): the data position carries over only for the same."""
    model_hook: ModelHook | None = None
    loss_hook: LossHook | None = None
    """Default: the model's own loss."""
    export_hook: ExportHook | None = None
    """Default: `llm.train.export.export_model` into `<out_dir>/model`."""
    fail_at_step: int | None = None
    """Testing hook: raise once after this step (and its checkpoint) to simulate an interruption."""
    kill_at_step: int | None = None
    """Testing hook: after this step the last rank SIGKILLs itself once (no exception, no cleanup: what the
    OOM killer or a lost node does to a worker)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Settings of a stage's hooks (`lora`, the distillation teacher), JSON values."""
    tracking: dict[str, Any] = field(default_factory=dict)
    """Where rank 0 logs per-step metrics besides `metrics.jsonl`: the stage's MLflow run (`mlflow_uri`,
    `mlflow_run_id`) and `tensorboard`, from `llm.tracking.worker_sinks` ({}: the stage section's own keys)."""

    def to_dict(self) -> dict[str, Any]:
        """The spec as Ray Train's `train_loop_config`: config sections as pydantic's JSON dump."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(train=self.train.model_dump(mode="json"), model=self.model.model_dump(mode="json"))
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LoopSpec:
        """The spec back from `to_dict()`, its config sections validated again by pydantic."""
        return cls(**{**config, "train": TrainConfig.model_validate(config["train"]),
                      "model": ModelConfig.model_validate(config["model"])})

