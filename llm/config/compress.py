"""The compress section: which variants to make (int8, pruned, distilled), how to evaluate them, which to serve."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from llm.config.base import Section
from llm.config.train import LmEvalConfig, ModelConfig, ScheduleConfig, SizingOverride, TrainConfig

Variant = Literal["int8", "pruned", "pruned-distilled", "student-distilled", "pruned-distilled-int8"]
DEFAULT_VARIANTS: tuple[Variant, ...] = ("int8", "pruned", "pruned-distilled")


class QuantizeConfig(Section):
    """Int8 weights of every linear layer."""

    cpu_kernel: Literal["torch_ao_dynamic"] = "torch_ao_dynamic"
    """CPU path: `torch.ao` dynamic quantization (int8 weights, activations quantized per batch). Chosen by
    measurement (bench/compress.py): torchao's int8 configs decoded slower than fp32 on a CPU without
    their kernels, torch.ao's fbgemm/qnnpack kernels 3x faster."""
    gpu_config: Literal["int8_weight_only", "float8_weight_only", "float8_dynamic"] = "int8_weight_only"
    """GPU path (`compress.device: cuda`): the `torchao` config, saved through `transformers`' TorchAoConfig."""
    embeddings: bool = True
    """Also store the token embedding as int8 rows with one scale each (dequantized when loaded): on small
    models the embedding is a large share of the file."""


class PruneConfig(Section):
    """Structured pruning: whole MLP channels and attention heads (whole KV groups), uniform across layers."""

    mlp_ratio: float = Field(0.5, ge=0, lt=1)
    """Fraction of MLP channels removed from every layer."""
    head_ratio: float = Field(0.0, ge=0, lt=1)
    """Fraction of KV groups (with their query heads) removed from every layer (llama-style models only)."""
    calib_rows: int = Field(32, ge=1)
    """Packed train rows whose activations rank the channels and heads."""
    multiple_of: int = Field(8, ge=1)
    """Kept MLP width is rounded to a multiple of this (kernels like aligned widths)."""


class DistillConfig(TrainConfig):
    """Distillation through the one train loop: KL on temperature-softened logits over label tokens, mixed with
    the plain next-token loss. Every `TrainConfig` knob applies (workers come from `compress.sizing`)."""

    NOT_HASHED: ClassVar[frozenset[str]] = TrainConfig.NOT_HASHED

    max_steps: int = Field(200, ge=1)
    """Optimizer steps of the student."""
    lr: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(peak=1e-3, warmup_steps=20))
    """Learning-rate schedule of the student."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature of teacher and student logits in the KL term (the term is scaled by T^2)."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the KL term; the plain next-token loss gets 1 - alpha."""
    data: Literal["auto", "packed", "sft"] = "auto"
    """Training rows: packed text, SFT rows (loss on assistant tokens), or auto (SFT rows when the original is the
    fine-tuned model and there are chat rows, or when there is no packed text in its tokenizer)."""
    student: ModelConfig | None = None
    """A smaller model built from this config for the `student-distilled` variant (random init)."""


class ChooseConfig(Section):
    """The rule that names the variant to serve."""

    prefer: Literal["smallest_disk", "fewest_params", "fastest"] = "smallest_disk"
    """Among variants that pass: least `disk_mb`, least `params`, or most `tok_s_serve` (serving tokens/s at
    `compress.eval.serve_batch`, by default `serve.max_batch_size`)."""
    min_speed_ratio: float = Field(1.0, ge=0)
    """A variant passes only when it generates at least this fraction of the original's `tok_s_serve`: 1.0 (the
    default) keeps a variant that is smaller but slower to serve (int8 on a CPU without fast kernels, at some
    batch sizes) from being chosen; 0 turns the check off."""
    max_ppl_increase: float = Field(0.10, ge=0)
    """Largest relative perplexity increase over the original (val and SFT perplexity, each where measured)."""
    max_rouge_drop: float = Field(0.05, ge=0)
    """Largest drop of ROUGE-L (0-1, absolute) below the original's."""
    min_task_scores: dict[str, float] = Field(default_factory=dict)
    """lm-eval gates: `{"<task>/<metric>": least value}` (e.g. `{llmray_cloze/acc: 0.3}`); a variant below one,
    or without the column, fails. The task must be in `compress.eval.lm_eval.tasks`."""


class CompressEvalConfig(Section):
    """What the one eval table measures every model on."""

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"batch_size"})

    val_rows: int = Field(64, ge=1)
    """Packed val rows scored."""
    sft_rows: int = Field(64, ge=1)
    """SFT val rows scored (where there are chat rows in the original's tokenizer: `llm.compress.tokens`)."""
    prompts: int = Field(16, ge=0)
    """Held-out chat prompts answered for ROUGE-L (the val side of the chat records compress reads:
    `data.sft.sources`, or `finetune.data` when the chat rows come from fine-tuning)."""
    max_new_tokens: int = Field(32, ge=1)
    """Most tokens generated per prompt."""
    speed_tokens: int = Field(32, ge=1)
    """Tokens generated per row when measuring tokens/s at batch 1, 8 and the serving batch."""
    serve_batch: int | None = Field(None, ge=1)
    """Batch at which serving tokens/s (`tok_s_serve`, what `choose` weighs) is measured; default:
    `serve.max_batch_size`, filled in when the config loads (so changing it makes the choice stale)."""
    batch_size: int = Field(8, ge=1)
    """Rows per forward pass for the losses."""
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    """lm-evaluation-harness tasks on the original and every variant (built-in ones from the packed val text,
    else the held-out chat records' text)."""


class CompressConfig(Section):
    """Quantization, pruning and distillation, each evaluated against the original; one chosen by rule."""

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"enabled"})

    enabled: bool = False
    """Run this stage in `llmray run`."""
    base: str | None = None
    """A local Hugging Face directory to compress; default: the finetune stage's `model/`, else pretrain's."""
    variants: list[Variant] = Field(default_factory=lambda: list(DEFAULT_VARIANTS))
    """Variants written to `compress/<variant>/`. `pruned` is kept before distillation so the recovery shows."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Device the variants are built and evaluated for (int8 kernels differ: torch.ao on CPU, torchao on GPU)."""
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    """Int8 quantization."""
    prune: PruneConfig = Field(default_factory=PruneConfig)
    """Structured pruning."""
    distill: DistillConfig = Field(default_factory=DistillConfig)
    """Distillation of the pruned model (or `distill.student`) from the original."""
    eval: CompressEvalConfig = Field(default_factory=CompressEvalConfig)
    """The comparison table."""
    choose: ChooseConfig = Field(default_factory=ChooseConfig)
    """Which variant serve gets."""
    sizing: SizingOverride = Field(default_factory=SizingOverride)
    """Worker sizing for distillation runs."""

    @model_validator(mode="after")
    def _variants(self) -> CompressConfig:
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: listed twice: {self.variants}")
        if "student-distilled" in self.variants and self.distill.student is None:
            raise ValueError("variants: student-distilled needs distill.student (a ModelConfig)")
        for key in self.choose.min_task_scores:
            task, slash, metric = key.partition("/")
            if not slash or not metric or task not in self.eval.lm_eval.tasks:
                raise ValueError(f"choose.min_task_scores: {key!r}: name a column `<task>/<metric>` of a task in "
                                 f"eval.lm_eval.tasks ({self.eval.lm_eval.tasks or 'none'})")
        return self
