"""The DeepSpeed config, generated from the typed training fields; a raw override is merged last.

The typed fields cover what a user normally sets (ZeRO stage, offload, precision, batch, clipping).
`pretrain.deepspeed` is for experts and is merged over the generated config, then validated: unknown
top-level keys, malformed ZeRO sections (checked with DeepSpeed's own pydantic model) and batch
arithmetic that disagrees with the world size are `ConfigError`s naming
`metadata.llm.<stage>.deepspeed.<key>`, not tracebacks from inside `deepspeed.initialize`.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any

from llm.config import LLM_PREFIX, TrainConfig
from llm.console import through_root
from llm.errors import ConfigError

# Top-level keys DeepSpeed's `DeepSpeedConfig` reads (deepspeed/runtime/config.py, 0.19).
KNOWN_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
    "gradient_clipping", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "communication_data_type",
    "seq_parallel_communication_data_type", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "flops_profiler", "wall_clock_breakdown",
    "memory_breakdown", "dump_state", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
    "aio", "checkpoint", "data_types", "compile", "timers", "elasticity", "pipeline", "data_efficiency",
    "curriculum_learning", "autotuning", "disable_allgather", "graph_harvesting",
    "use_data_before_expert_parallelism", "dataloader_drop_last", "nebula", "hybrid_engine",
    "weight_quantization", "compression_training", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "sparse_attention",
})
# Owned by the loop: the optimizer is a torch AdamW (no JIT-built fused op) and the LR schedule is
# llm.train.schedules, so these would conflict with what the loop passes to `deepspeed.initialize`.
OWNED_KEYS = {"optimizer": "use the typed fields lr, betas and weight_decay",
              "scheduler": "use the typed lr schedule (llm.train.schedules)"}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `override` wins, mappings merge key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def generated(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config the typed fields describe, for `world_size` data-parallel ranks."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if train.zero_stage == 3:
        # Export gathers the full weights from the partitions itself (llm.train.export).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # A torch AdamW (or DeepSpeedCPUAdam with offload) is passed in; ZeRO wraps it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # the loop prints its own live line
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        # bf16 has fp32's range: DeepSpeed's overflow scan is a whole extra pass over the gradients each step
        # (3% of a small model's step here). Where the clipped norm is computed anyway, the loop stops on a
        # non-finite norm itself, before that step's checkpoint; without clipping the scan stays on.
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": train.grad_clip <= 0}
    elif train.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def build(train: TrainConfig, world_size: int, stage: str = "pretrain") -> dict[str, Any]:
    """Generated config with `train.deepspeed` merged last, then validated.

    Args:
        train: the stage's typed training fields.
        world_size: data-parallel ranks.
        stage: config section name, for error messages.

    Raises:
        ConfigError: naming `metadata.llm.<stage>.deepspeed.<key>`.
    """
    cfg = merge(generated(train, world_size), train.deepspeed)
    validate(cfg, train.deepspeed, world_size, stage)
    return cfg


def validate(cfg: dict[str, Any], override: dict[str, Any], world_size: int, stage: str = "pretrain") -> None:
    """Check a merged DeepSpeed config; errors name the override's key."""
    where = f"{LLM_PREFIX}.{stage}.deepspeed"

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{where}.{key}: {problem}")

    for key in override:
        if key in OWNED_KEYS:
            fail(key, f"set by the training loop; {OWNED_KEYS[key]}")
        if key not in KNOWN_KEYS:
            fail(key, "not a DeepSpeed config key")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(key, f"must be a positive integer (got {value!r})")
    micro, accum, total = (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"],
                           cfg["train_batch_size"])
    if micro * accum * world_size != total:
        fail("train_batch_size", f"{total} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
             f"{accum} x world size {world_size}")
    clip = cfg.get("gradient_clipping", 0)
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0:
        fail("gradient_clipping", f"must be a number >= 0 (got {clip!r})")
    enabled = []
    for key in ("fp16", "bf16", "bfloat16"):
        section = cfg.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            fail(key, f"must be a mapping (got {section!r})")
        flag = section.get("enabled", False)
        if not isinstance(flag, bool):
            fail(f"{key}.enabled", f"must be true or false (got {flag!r})")
        if flag:
            enabled.append(key)
    if len(enabled) > 1:
        culprit = next((k for k in enabled if k in override), enabled[-1])
        fail(culprit, f"{' and '.join(enabled)} are both enabled; choose one precision")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        fail("zero_optimization", f"must be a mapping (got {zero!r})")
    from pydantic import ValidationError

    DeepSpeedZeroConfig = _import_zero_config()

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        fail(f"zero_optimization.{loc}" if loc else "zero_optimization", f"{err['msg']} (got {err.get('input')!r})")


def keep_global_batch(cfg: dict[str, Any], global_batch: int, world_size: int, stage: str,
                      source: str) -> dict[str, Any]:
    """`cfg` for `world_size` ranks resuming a run whose optimizer steps took `global_batch` sequences: the
    gradient accumulation absorbs the world-size change.

    Raises:
        ConfigError: when micro batch x world size does not divide the global batch, naming the keys.
    """
    micro = cfg["train_micro_batch_size_per_gpu"]
    if global_batch % (micro * world_size):
        raise ConfigError(
            f"{LLM_PREFIX}.{stage}.sizing.workers: {world_size} workers x micro_batch_size {micro} does not divide "
            f"the global batch of {global_batch} sequences that {source} was trained with; choose "
            f"{LLM_PREFIX}.{stage}.sizing.workers (or micro_batch_size) so that their product divides {global_batch}")
    accum = global_batch // (micro * world_size)
    return {**cfg, "gradient_accumulation_steps": accum, "train_batch_size": global_batch}


def precision_dtype(train: TrainConfig) -> str:
    """torch dtype name the model computes in."""
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[train.precision]


def import_deepspeed() -> Any:
    """`import deepspeed`, without the MLflow import its autotuner makes when MLflow is installed.

    `deepspeed/autotuning/autotuner.py` runs `import mlflow` at import time (for autotuning's own logging,
    which no stage uses): 1.2 s of every Ray Train worker's start here, every run. MLflow is hidden for
    that one import only when nothing in the process has imported it yet; whatever imports it later (the
    stage's own tracking) gets the real module.
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def _import_zero_config() -> Any:
    """DeepSpeed's `DeepSpeedZeroConfig`. Here the driver first imports DeepSpeed, whose import gives its
    logger a stdout handler of its own: the logger is handed to the root logger (`llm.console.through_root`,
    so the stage log). The import itself logs the accelerator it detected ("Setting accelerator to CPU"),
    which says nothing about the workers, where training runs: that record is dropped (`disabled` during
    the import), the only one no handler could take, as it comes before the logger can be configured."""
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.disabled = True
    try:
        import_deepspeed()
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    finally:
        ds_logger.disabled = False
    through_root("DeepSpeed")
    return DeepSpeedZeroConfig
