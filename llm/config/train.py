"""The training sections: the one train loop's knobs, shared by pretraining and fine-tuning."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from llm.config.base import Section

Family = Literal["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt2"]
FAMILIES: tuple[str, ...] = get_args(Family)
"""Decoder families a model is built as (`ModelConfig.type`); `gemma3` is Gemma 3's text model (`gemma3_text`)."""
SHAPE_NAMES: dict[str, tuple[str, ...]] = {
    "d_model": ("hidden_size", "n_embd"), "n_layers": ("num_hidden_layers", "n_layer"),
    "n_heads": ("num_attention_heads", "n_head"), "n_kv_heads": ("num_key_value_heads",),
    "d_ff": ("intermediate_size", "n_inner"), "context": ("max_position_embeddings", "n_positions"),
    "tie_embeddings": ("tie_word_embeddings",),
}
"""Shape field -> what a family's `transformers` config class may call it (the first name it takes is set)."""
_FROM_TOKENIZER = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def hf_model_type(family: str) -> str:
    """The `transformers` model_type of a family name (`gemma3` builds Gemma 3's text-only model)."""
    return "gemma3_text" if family == "gemma3" else family


class ModelConfig(Section):
    """A Hugging Face causal LM built from a config (any family in `FAMILIES`), or loaded from a local directory.

    The shape fields (`n_layers`, `d_model`, ...) are set on the family's own `transformers` config class
    under its names (`hidden_size`, or GPT-2's `n_embd`); `config` carries the family's other fields.
    """

    path: str | None = None
    """A local directory that `AutoModelForCausalLM.from_pretrained` loads; when set, the fields below are
    ignored. Nothing is downloaded."""
    type: Family | None = None
    """The decoder family to build, through its own `transformers` config class (Qwen2's biases, Qwen3's
    q/k norms, Gemma's soft-capping and sliding windows, Phi-3's fused projections come with it);
    `gemma3` is Gemma 3's text model. Default: `arch`."""
    config_file: str | None = None
    """A local `config.json` (e.g. a published model's, or its directory) to build from with fresh weights:
    its family, shape and fields as written, `config` over them; the shape fields below are ignored. The
    vocabulary and special tokens always come from the data stage's tokenizer."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The family's own config fields, passed to its config class (e.g. `{head_dim: 64, rope_theta:
    1000000.0, sliding_window: 512}`); a name the class does not take is an error, and so, without
    `config_file`, are the names the shape fields set (use `d_model`, not `hidden_size`)."""
    arch: Literal["llama", "gpt2"] = "llama"
    """The family when `type` is not set (the older spelling; `type` wins). llama (nn.Linear everywhere)
    quantizes better than gpt2 (Conv1D)."""
    n_layers: int = Field(2, ge=1)
    """Transformer blocks."""
    d_model: int = Field(64, ge=8)
    """Hidden width."""
    n_heads: int = Field(4, ge=1)
    """Attention heads; must divide `d_model` unless `config` sets `head_dim`."""
    n_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention (not gpt2); default: `n_heads`."""
    d_ff: int | None = Field(None, ge=8)
    """MLP width; default 4 x d_model for gpt2, 8/3 x d_model rounded up to 64 otherwise."""
    context: int = Field(512, ge=8)
    """Maximum positions; at least `data.seq_len`."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention and residuals (every dropout the family's config class has)."""
    tie_embeddings: bool = True
    """Share input and output embeddings."""

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if "head_dim" not in self.config and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.path is not None and self.config_file is not None:
            raise ValueError("set one of path (a model with its weights) and config_file (fresh weights)")
        if self.family == "gpt2" and self.n_kv_heads not in (None, self.n_heads):
            raise ValueError("n_kv_heads: gpt2 has no grouped-query attention")
        owned = {name: field for field, names in SHAPE_NAMES.items() for name in names}
        for key in self.config:
            if key in owned and self.config_file is None:
                raise ValueError(f"config.{key}: set by the shape field `{owned[key]}`")
            if key in _FROM_TOKENIZER or key == "model_type":
                raise ValueError(f"config.{key}: comes from the data stage's tokenizer and `type`, not from here")
        return self

    @property
    def family(self) -> str:
        """The family built (`type`, else `arch`); a `config_file`'s own family is read when building."""
        return self.type or self.arch

    def ff_width(self) -> int:
        """The MLP width actually used."""
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "gpt2":
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

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"cpus_per_worker", "placement_strategy"})

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

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({
        "enabled", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "max_failures",
        "tensorboard", "mlflow_uri", "compile",
    })

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
    lr: ScheduleConfig | Literal["best"] = Field(default_factory=ScheduleConfig)
    """Learning-rate schedule, or `best`: the winning schedule of the committed sweep (`sweep/best.json`)."""
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
    compile: bool = False
    """`torch.compile` the model (in place: checkpoints and the export keep their keys). On GPUs, faster
    steps after a one-time compile of tens of seconds; on CPU it rarely pays for the compile."""
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config merged last over the generated one; still validated."""
    checkpoint_every: int = Field(200, ge=1)
    """Save a DeepSpeed checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=2)
    """Whole checkpoints kept (across restarts). At least two: a damaged newest one falls back to the one before."""
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
    init_from: str | None = None
    """Continue on purpose from earlier training: a stage folder (its newest whole checkpoint, else its
    `model/`), one checkpoint folder (weights, optimizer and step: raise `max_steps` to train further; the
    data position carries over only when the data is the same), or a Hugging Face model directory (weights
    only). Editing the config never continues a finished run by itself."""

    @model_validator(mode="after")
    def _offload(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self

    def schedule(self) -> ScheduleConfig:
        """The schedule itself; `lr: best` must have been resolved by the stage (`llm.tune.best`) first."""
        if isinstance(self.lr, ScheduleConfig):
            return self.lr
        raise ValueError("lr: best is read from sweep/best.json by the stage before training starts")


class PretrainConfig(TrainConfig):
    """Pretraining a causal LM on the data stage's packed sequences."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to build (or load from a local directory)."""


class LoraSettings(Section):
    """LoRA adapters through `peft`: low-rank updates on the chosen linear layers, the base frozen."""

    rank: int = Field(8, ge=1)
    """Rank r of each update B @ A."""
    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the update is added as (alpha / rank) * B @ A."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | None = None
    """Module names to adapt (e.g. `[q_proj, v_proj]`); default: every linear layer of attention and MLP."""


class LmEvalConfig(Section):
    """lm-evaluation-harness tasks scored on every model of an eval table, one column per task metric
    (`<task>/<metric>`, in the printed table, `eval.json` and the report)."""

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"batch_size"})

    tasks: list[str] = Field(default_factory=list)
    """Task names. `llmray_ppl` (rolling perplexity of held-out passages: word and byte perplexity, bits per
    byte) and `llmray_cloze` (the true ending of a held-out passage among four: acc, acc_norm) are written from
    the table's own held-out text into `<stage>/lm_eval/`; any task of the installed lm-eval whose data is on
    this machine (`lm_eval --tasks list`), or one in `include_path`. Empty: none."""
    include_path: str | None = None
    """A folder of your own lm-eval task YAML files (their data local)."""
    limit: int | None = Field(64, ge=1)
    """Documents per task, the first ones (None: all)."""
    batch_size: int = Field(8, ge=1)
    """Requests per forward pass (the scores do not depend on it)."""


class FinetuneEvalConfig(Section):
    """Before/after evaluation of the base and the fine-tuned model on the held-out SFT split."""

    enabled: bool = True
    """Evaluate both models at the end of the stage (`finetune/eval.json`)."""
    sft_rows: int = Field(256, ge=1)
    """Held-out SFT rows scored for the assistant-token loss."""
    prompts: int = Field(32, ge=0)
    """Held-out prompts answered greedily for ROUGE-L, BLEU, exact match and token F1 (0: none)."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens generated per prompt."""
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    """lm-evaluation-harness tasks on the base and the fine-tuned model (built-in ones from the held-out
    conversations' text)."""


class FinetuneConfig(TrainConfig):
    """Fine-tuning (full or LoRA) on chat SFT examples, from our pretrained model or a local HF model."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    base: str | None = None
    """A local Hugging Face causal LM directory with its tokenizer (any decoder family `transformers`
    implements: Llama, Qwen, Mistral, Gemma, Phi-3, OLMo 2, GPT-2, ...; checked before Ray starts); default: the
    pretrain stage's `model/`. Nothing is downloaded."""
    data: list[str] = Field(default_factory=list)
    """JSONL files or globs (`messages` or `prompt`/`response` records) or Hugging Face `datasets` folders
    (`save_to_disk`); default: the data stage's SFT examples (its `data.sft.sources`)."""
    method: Literal["full", "lora"] = "lora"
    """`full` trains every weight; `lora` trains adapters and merges them into `finetune/model/`."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """LoRA settings (method `lora`)."""
    max_len: int | None = Field(None, ge=16)
    """Examples longer than this many tokens are truncated; default: `data.sft.max_len`."""
    val_fraction: float | None = Field(None, ge=0, lt=1)
    """Held-out fraction chosen by example hash; default: `data.sft.val_fraction` (the data stage's split)."""
    eval: FinetuneEvalConfig = Field(default_factory=FinetuneEvalConfig)
    """Before/after evaluation."""
    max_steps: int = Field(200, ge=1)
    """Optimizer steps."""
    lr: ScheduleConfig | Literal["best"] = Field(default_factory=lambda: ScheduleConfig(peak=2e-4, warmup_steps=10))
    """Learning-rate schedule (LoRA usually wants a higher peak than full fine-tuning), or `best`: the winning
    schedule of the committed sweep with `sweep.target: finetune`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""

    @model_validator(mode="after")
    def _no_init_from(self) -> FinetuneConfig:
        if self.init_from is not None:
            raise ValueError("init_from is for pretraining; fine-tuning starts from `base` (a model directory)")
        return self
