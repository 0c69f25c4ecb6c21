"""The typed pipeline config: the `metadata.llm` section of a Ray cluster file.

One pydantic model per stage, `extra="forbid"` everywhere so a typo is an error that names the key.
Loading (`load_config`) reads the cluster file, applies dotted overrides, validates both halves and
raises `ConfigError` with a one-line message: dotted key, problem, file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm.errors import ConfigError

LLM_PREFIX = "metadata.llm"
STAGE_SECTIONS = ("data", "pretrain", "sweep", "finetune", "compress", "serve")
"""The pipeline's stage sections, in run order."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------------- data


class QualityConfig(Section):
    """Gopher-style document quality heuristics (Rae et al. 2021, appendix A). `enabled: false` skips all."""

    enabled: bool = True
    """Apply the quality filters at all."""
    min_words: int = Field(20, ge=0)
    """Drop documents with fewer words (reason `few_words`)."""
    max_words: int = Field(100_000, gt=0)
    """Drop documents with more words (reason `many_words`)."""
    min_mean_word_len: float = Field(3.0, ge=0)
    """Drop when the mean word length is below this (reason `short_words`)."""
    max_mean_word_len: float = Field(10.0, gt=0)
    """Drop when the mean word length is above this (reason `long_words`)."""
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    """Drop when '#' and '...' per word exceed this (reason `symbols`)."""
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1)
    """Drop when fewer words than this fraction contain a letter (reason `non_alpha`)."""
    max_dup_line_fraction: float = Field(0.3, ge=0, le=1)
    """Drop when more lines than this fraction repeat another line (reason `dup_lines`)."""


class LanguageConfig(Section):
    """Language identification with a model shipped inside a PyPI package (nothing downloaded at run time)."""

    enabled: bool = False
    """Filter by language at all."""
    allowed: list[str] = Field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep; others are dropped as `language`."""
    min_score: float = Field(0.5, ge=0, le=1)
    """Minimum confidence of the detected language."""


class PiiConfig(Section):
    """PII redaction into placeholders such as `<EMAIL>`; counts per kind land in the stats."""

    enabled: bool = True
    """Redact PII at all."""
    kinds: list[Literal["email", "phone", "ip", "card"]] = Field(
        default=["email", "phone", "ip", "card"]  # pydantic copies mutable defaults per instance
    )
    """Which kinds to redact. Card numbers are redacted only when they pass the Luhn check."""


class FuzzyDedupConfig(Section):
    """MinHash + LSH near-duplicate removal."""

    enabled: bool = True
    """Run fuzzy dedup at all."""
    threshold: float = Field(0.8, gt=0, lt=1)
    """Jaccard similarity above which two documents are duplicates; LSH bands/rows derive from it."""
    num_perm: int = Field(128, ge=8, le=1024)
    """Number of MinHash permutations."""
    ngram: int = Field(5, ge=1, le=32)
    """Word n-gram (shingle) size."""
    seed: int = 42
    """Seed of the permutations: same seed, same signatures."""


class DedupConfig(Section):
    """Exact and fuzzy deduplication."""

    exact: bool = True
    """Drop documents whose normalized content hash was seen before (deterministic survivor)."""
    fuzzy: FuzzyDedupConfig = Field(default_factory=FuzzyDedupConfig)
    """Near-duplicate removal."""


class TokenizerConfig(Section):
    """Tokenizer: train a byte-level BPE on a sample of the cleaned text, or use a local one."""

    path: str | None = None
    """A local directory that `AutoTokenizer.from_pretrained` loads; when set, nothing is trained."""
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    """Vocabulary size of the trained BPE, special tokens included."""
    sample_bytes: int = Field(50_000_000, gt=0)
    """Train on at most this many bytes of cleaned text."""
    min_frequency: int = Field(2, ge=1)
    """Merges need at least this many occurrences."""


class SftConfig(Section):
    """Supervised fine-tuning data: chat or instruction JSONL rendered with the chat template."""

    sources: list[str] = Field(default_factory=list)
    """JSONL paths or globs (`messages` or `prompt`/`response` records), or `builtin:python-sft`."""
    max_len: int = Field(512, ge=16)
    """Examples longer than this many tokens are truncated (counted)."""
    val_fraction: float = Field(0.05, ge=0, lt=1)
    """Fraction of examples held out, chosen by example hash."""


class DataConfig(Section):
    """Data stage: read, clean, dedup, train a tokenizer, tokenize and pack, format SFT data."""

    enabled: bool = True
    """Run this stage in `llmray run`."""
    sources: list[str] = Field(default_factory=lambda: ["builtin:python-docs"])
    """Local paths or globs (txt, jsonl, parquet, .gz), s3:// or gs:// URIs, or `builtin:python-docs`."""
    text_field: str = "text"
    """Column or JSON key holding the text in jsonl and parquet sources."""
    min_chars: int = Field(200, ge=0)
    """Drop documents shorter than this (reason `too_short`)."""
    max_chars: int = Field(1_000_000, gt=0)
    """Drop documents longer than this (reason `too_long`); longer lines are never held whole in memory."""
    quality: QualityConfig = Field(default_factory=QualityConfig)
    """Gopher-style quality filters."""
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    """Language identification filter."""
    pii: PiiConfig = Field(default_factory=PiiConfig)
    """PII redaction."""
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    """Deduplication."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """Tokenizer training or loading."""
    seq_len: int = Field(512, ge=8)
    """Length of every packed training sequence, in tokens."""
    val_fraction: float = Field(0.02, ge=0, lt=1)
    """Fraction of documents held out for validation, chosen by document hash."""
    sft: SftConfig = Field(default_factory=SftConfig)
    """Fine-tuning data formatting."""
    keep_dropped: bool = False
    """Write dropped documents with their reason under `data/dropped/`."""
    rows_per_shard: int = Field(4096, gt=0)
    """Packed sequences per output parquet shard (upper bound)."""
    parallelism: int | None = Field(None, gt=0)
    """Ray Data parallelism override; by default derived from the cluster's CPUs."""
    max_errored_blocks: int = Field(0, ge=0)
    """Ray Data `max_errored_blocks`. 0: a block error fails the stage, since bad records are already caught
    per record and per file; a block error means a bug, and silently losing a block would lose data."""


# ------------------------------------------------------------------------------------------ training


class ModelConfig(Section):
    """A Hugging Face causal LM built from a config, or loaded from a local directory."""

    path: str | None = None
    """A local directory that `AutoModelForCausalLM.from_pretrained` loads; when set, the fields below are
    ignored. Nothing is downloaded."""
    arch: Literal["llama", "gpt2"] = "llama"
    """Architecture family. llama (nn.Linear everywhere) quantizes better than gpt2 (Conv1D)."""
    n_layers: int = Field(2, ge=1)
    """Transformer blocks."""
    d_model: int = Field(64, ge=8)
    """Hidden width."""
    n_heads: int = Field(4, ge=1)
    """Attention heads; must divide `d_model`."""
    n_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention (llama only); default: `n_heads`."""
    d_ff: int | None = Field(None, ge=8)
    """MLP width; default 4 x d_model for gpt2, 8/3 x d_model rounded up to 64 for llama."""
    context: int = Field(512, ge=8)
    """Maximum positions; at least `data.seq_len`."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention and residuals."""
    tie_embeddings: bool = True
    """Share input and output embeddings."""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        return self

    def ff_width(self) -> int:
        """The MLP width actually used."""
        if self.d_ff is not None:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return -(-int(8 * self.d_model / 3) // 64) * 64


class ScheduleConfig(Section):
    """Learning-rate schedule, shared by every training stage."""

    kind: Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt"] = "cosine"
    """cosine/linear decay to the floor, constant after warmup, warmup-stable-decay, inverse square root."""
    peak: float = Field(3e-4, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warmup from 0 to `peak`."""
    floor: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of `peak` (cosine, linear, wsd)."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd only: the last fraction of steps that decays to the floor."""


class SizingOverride(Section):
    """Per-stage overrides of what is derived from the cluster's node types."""

    workers: int | None = Field(None, ge=0)
    """Ray Train workers (0 runs the loop in the driver); default: one per GPU, else derived from CPUs."""
    cpus_per_worker: float | None = Field(None, gt=0)
    """CPUs each worker reserves; fractional values leave room for Ray Data on small machines."""
    use_gpu: bool | None = None
    """Train on GPUs; default: whenever the cluster has them."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: PACK fills a node first (fastest collectives); STRICT_SPREAD puts
    each worker on its own node."""


class TrainConfig(Section):
    """Fields shared by pretraining and fine-tuning: the one train loop's knobs."""

    enabled: bool = True
    """Run this stage in `llmray run`."""
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro batches accumulated per optimizer step."""
    global_batch_size: int | None = Field(None, ge=1)
    """Optional cross-check: must equal micro_batch_size x grad_accum x workers."""
    lr: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """ZeRO CPU offload of optimizer state (stage >= 1)."""
    offload_params: bool = False
    """ZeRO CPU offload of parameters (stage 3 only)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Mixed precision; fp16 uses dynamic loss scaling."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config merged last over the generated one; still validated."""
    checkpoint_every: int = Field(200, ge=1)
    """Save a DeepSpeed checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept by Ray Train."""
    eval_every: int = Field(200, ge=1)
    """Validation loss every this many steps (and at the end)."""
    eval_batches: int = Field(20, ge=1)
    """Validation batches per evaluation."""
    log_every: int = Field(10, ge=1)
    """Metrics line every this many steps."""
    max_failures: int = Field(2, ge=-1)
    """Ray Train FailureConfig.max_failures: worker-group restarts from the last checkpoint."""
    seed: int = 1337
    """Seed of model init, data order and dropout."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    mlflow_uri: str | None = None
    """Also log to this MLflow tracking URI."""
    sizing: SizingOverride = Field(default_factory=SizingOverride)
    """Overrides of the cluster-derived worker sizing."""

    @model_validator(mode="after")
    def _offload(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


class PretrainConfig(TrainConfig):
    """Pretraining a causal LM on the data stage's packed sequences."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to build (or load from a local directory)."""


class FinetuneConfig(TrainConfig):
    """Fine-tuning (full or LoRA) on the data stage's SFT examples. Grown by the fine-tuning issue."""

    enabled: bool = False
    """Run this stage in `llmray run`."""


class SweepConfig(Section):
    """Ray Tune sweep over learning-rate schedules. Grown by the sweep issue."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once; default: derived from the cluster (one per worker group that fits)."""
    sizing: SizingOverride = Field(default_factory=SizingOverride)
    """Per-trial worker sizing overrides."""


class CompressConfig(Section):
    """Quantization, pruning and distillation. Grown by the compression issue."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    sizing: SizingOverride = Field(default_factory=SizingOverride)
    """Worker sizing for distillation runs."""


class ServeConfig(Section):
    """Ray Serve OpenAI-compatible application. Grown by the serving issue."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    min_replicas: int | None = Field(None, ge=0)
    """Autoscaling lower bound; default 1."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling upper bound; default: one per GPU (or per 2 CPUs on CPU clusters)."""


class RayConfig(Section):
    """How a stage reaches Ray."""

    address: str | None = None
    """Cluster address; default: `RAY_ADDRESS`, else a running local cluster, else start one."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a Ray started by the stage itself. More than the cores (Ray's testing tip) so that
    Train workers do not starve Ray Data's read tasks on small machines."""


class PlanConfig(Section):
    """Assumptions of `llmray plan`'s time estimate."""

    mfu: float = Field(0.4, gt=0, le=1)
    """Model FLOPs utilization assumed for the wall-time estimate."""
    gpu: str | None = None
    """GPU model for the peak FLOP/s (e.g. H100, A100); default: from the worker's instance type."""


class PipelineConfig(Section):
    """The whole pipeline: `metadata.llm` of a Ray cluster file."""

    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Run name: the folder under `storage` that holds every stage's outputs."""
    storage: str
    """Local path or URI (s3://, gs://) under which `<run>/<stage>/` folders are written. `~` expands; a
    relative path is resolved against the working directory."""
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

    @model_validator(mode="after")
    def _context_fits(self) -> PipelineConfig:
        if self.pretrain.model.path is None and self.pretrain.model.context < self.data.seq_len:
            raise ValueError(
                f"pretrain.model.context ({self.pretrain.model.context}) must be >= data.seq_len ({self.data.seq_len})"
            )
        return self

    def enabled_stages(self) -> list[str]:
        """Names of the stage sections with `enabled: true`, in pipeline order."""
        return [name for name in STAGE_SECTIONS if getattr(self, name).enabled]

    def stage_dir(self, stage: str) -> str:
        """`<storage>/<run>/<stage>`: the only place a stage writes."""
        return f"{self.storage.rstrip('/')}/{self.run}/{stage}"


class LoadedConfig(BaseModel):
    """A validated cluster file: the pipeline config plus the Ray half it came with."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    cluster: dict[str, Any]
    llm: PipelineConfig


def default_config_path() -> Path:
    """`cluster/local.yaml` of the checkout (or the working directory)."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "cluster" / "local.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError("no config given and cluster/local.yaml not found in the working directory")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LoadedConfig:
    """Load, override and validate a cluster file. Raises `ConfigError` naming the key and the file."""
    from llm.loading import load

    return load(Path(path) if path is not None else default_config_path(), list(overrides))
