"""The root of the config tree: `PipelineConfig` (the `metadata.llm` section) and how stages reach Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from llm.config.base import Section
from llm.config.compress import CompressConfig
from llm.config.data import DataConfig
from llm.config.serve import ServeConfig
from llm.config.sweep import SweepConfig
from llm.config.tracking import TrackingConfig
from llm.config.train import FinetuneConfig, PretrainConfig


class RayConfig(Section):
    """How a stage reaches Ray."""

    address: str | None = None
    """Cluster address; default: `RAY_ADDRESS`, else a running local cluster, else start one."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a Ray started by the stage itself. More than the cores (Ray's testing tip) so that
    Train workers do not starve Ray Data's read tasks on small machines."""
    resource_timeout_s: float = Field(900.0, gt=0)
    """How long a training stage waits for the cluster to reach its planned size (the autoscaler starting
    GPU nodes) before failing with the shortfall, instead of training on fewer workers."""


class PlanConfig(Section):
    """Assumptions of `llmray plan`'s time, cost and memory estimates."""

    mfu: float = Field(0.4, gt=0, le=1)
    """Model FLOPs utilization assumed for the wall-time estimate."""
    gpu: str | None = None
    """GPU model for the peak FLOP/s (e.g. H100, A100); default: from the worker's instance type."""
    peak_tflops: float | None = Field(None, gt=0)
    """Dense bf16 peak TFLOP/s of one GPU; default: the datasheet figure of `gpu`."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU in GiB; default: from the instance type (or `gpu`)."""
    prices: dict[str, float] = Field(default_factory=dict)
    """USD per node-hour by node type name or instance type, over the built-in on-demand estimates (the
    shipped file's instance types); a node type without a price shows no cost."""

    @model_validator(mode="after")
    def _prices(self) -> PlanConfig:
        bad = {k: v for k, v in self.prices.items() if v < 0}
        if bad:
            raise ValueError(f"prices must be >= 0 USD per hour (got {bad})")
        return self


class PipelineConfig(Section):
    """The whole pipeline: `metadata.llm` of a Ray cluster file."""

    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Run name: the folder under `storage` that holds every stage's outputs."""
    storage: str
    """Local path or URI (s3://, gs://) under which `<run>/<stage>/` folders are written. `~` expands; a
    relative path is resolved against the working directory."""
    on_change: Literal["keep", "refuse"] = "keep"
    """When a stage's output-changing config (or its input) differs from its committed folder's: `keep`
    moves the committed folder aside (`<stage>.<time>`, printed) and reruns; `refuse` stops with the
    changed keys. Nothing committed is ever deleted."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How stages reach Ray."""
    plan: PlanConfig = Field(default_factory=PlanConfig)
    """Assumptions of `llmray plan`."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Data stage."""
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """Pretraining stage."""
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    """Learning-rate sweep stage."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Fine-tuning stage."""
    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Compression stage."""
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """Serving stage."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow, W&B, TensorBoard) of every stage; off by default."""

    _cluster: dict[str, Any] | None = PrivateAttr(None)
    """The Ray half of the cluster file this config came from: the sizing source at run time."""

    @field_validator("storage")
    @classmethod
    def _local_uri(cls, v: str) -> str:
        # `file:///x` is the local path /x (`file://localhost/x` too): kept as a URI, every process would
        # write under `./file:/x` relative to its own working directory.
        if v.startswith("file://"):
            rest = v.removeprefix("file://")
            host, sep, path = rest.partition("/")
            if host not in ("", "localhost"):
                raise ValueError(f"a file:// URI names this machine's files only (got host {host!r} in {v})")
            return "/" + path if sep else "/"
        return v

    @model_validator(mode="after")
    def _context_fits(self) -> PipelineConfig:
        if self.pretrain.model.path is None and self.pretrain.model.context < self.data.seq_len:
            raise ValueError(
                f"pretrain.model.context ({self.pretrain.model.context}) must be >= data.seq_len ({self.data.seq_len})"
            )
        return self

    @model_validator(mode="after")
    def _serve_batch(self) -> PipelineConfig:
        # The choice weighs serving speed at the batch serve runs; a filled-in value is hashed with compress.
        if self.compress.eval.serve_batch is None:
            self.compress.eval.serve_batch = self.serve.max_batch_size
        return self

    def cluster(self) -> dict[str, Any]:
        """The cluster file's Ray half (node types); `{}` for a config not loaded from a file."""
        return self._cluster or {}

    def stage_dir(self, stage: str) -> str:
        """`<storage>/<run>/<stage>`: the only place a stage writes."""
        return f"{self.storage.rstrip('/')}/{self.run}/{stage}"


class LoadedConfig(BaseModel):
    """A validated cluster file: the pipeline config plus the Ray half it came with."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    cluster: dict[str, Any]
    llm: PipelineConfig
