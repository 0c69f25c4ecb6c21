"""Memory per GPU of a training setting: model states from DeepSpeed's own estimators, plus activations.

`llmray plan` shows it for every ZeRO stage and, when the configured setting does not fit the node type's
GPU, the cheapest change that does (`smallest_fit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

USABLE_GPU_FRACTION = 0.9
USABLE_GPU_FRACTION = 0.9
"""Share of a GPU's memory left for model states and activations: the CUDA context, NCCL buffers and the
caching allocator's fragmentation take the rest (a rule of thumb, not a measurement)."""
USABLE_CPU_FRACTION = 0.6
"""Share of a node's RAM left for offloaded ZeRO states: Ray's object store takes 30% by default, the OS,
Ray Data and the workers' own processes part of the rest."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of a model."""

    total: int
    """Parameters held (a tied embedding once)."""
    trainable: int
    """Parameters the optimizer updates (all of them, or LoRA's adapters)."""
    largest_layer: int
    """Parameters of the largest single module (ZeRO-3 gathers one at a time)."""
    n_layers: int
    d_model: int
    vocab: int
    compute: int = 0
    """Parameters that cost FLOPs per token: matmul weights, the output head even when tied."""
    ff: int = 0
    """MLP width (0: 4 x d_model)."""
    arch: str = "llama"
    """Block family for the activation estimate: `llama` (RMSNorm, SwiGLU) or `gpt2`."""


@dataclass(frozen=True)
class MemorySetting:
    """The training knobs that change memory per GPU (a `TrainConfig`'s, by the same names)."""

    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = 1
    gradient_checkpointing: bool = False

    @property
    def label(self) -> str:
        off = "+offload opt+params" if self.offload_params else "+offload opt" if self.offload_optimizer else ""
        return f"ZeRO-{self.zero_stage}{off}"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (and per node's CPU RAM for offloaded states)."""

    model_states: int
    activations: int
    cpu_per_node: int

    @property
    def total(self) -> int:
        return self.model_states + self.activations


def _ds_estimators() -> tuple[Any, Any]:
    import logging

    # Importing DeepSpeed picks its accelerator and warns on a machine without one; the plan runs anywhere.
    logging.disable(logging.WARNING)
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    finally:
        logging.disable(logging.NOTSET)
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def model_states_bytes(params: int, largest_layer: int, setting: MemorySetting, gpus_per_node: int,
                       nodes: int) -> tuple[int, int]:
    """(GPU bytes, CPU bytes per node) of parameters, gradients and Adam states, from DeepSpeed's estimators.

    DeepSpeed ships estimators for ZeRO-2 and ZeRO-3 only (mixed precision: 16-bit weights and gradients,
    fp32 master weights, gradients and Adam moments). ZeRO-0 is the ZeRO-2 estimate on one GPU (nothing
    partitioned); ZeRO-1 is ZeRO-2 plus the 16-bit gradients that stage 1 keeps whole on every GPU.
    """
    zero2, zero3 = _ds_estimators()
    gpus = max(1, gpus_per_node * nodes)
    if setting.zero_stage == 3:
        cpu, gpu, _ = zero3(params, largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                            cpu_offload=setting.offload_optimizer, cpu_offload_params=setting.offload_params)
        return gpu, cpu
    if setting.zero_stage == 0:
        cpu, gpu = zero2(params, num_gpus_per_node=1, num_nodes=1, cpu_offload=False)
        return gpu, cpu
    cpu, gpu = zero2(params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=setting.offload_optimizer)
    if setting.zero_stage == 1:
        gpu += int(2 * params * (1 - 1 / gpus))
    return gpu, cpu


# Bytes per token that one block keeps for its backward pass in 16-bit, as (per d_model, per MLP width):
# measured as the autograd saved tensors of Hugging Face's blocks with SDPA attention (tests/test_memory.py
# measures them again). Llama's RMSNorm keeps fp32 copies and its SwiGLU three MLP-wide tensors; GPT-2's
# tanh GELU keeps its intermediates. Korthikanti et al. (2022) count 34 x d_model for Megatron's fused blocks.
BLOCK_BYTES_PER_TOKEN = {"llama": (24, 8), "gpt2": (16, 10)}


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool,
                     precision: str = "bf16") -> int:
    """Activations of one micro batch at the start of the backward pass.

    Every block's saved tensors (`BLOCK_BYTES_PER_TOKEN`; SDPA keeps no seq^2 score matrix), or with
    activation checkpointing each block's 16-bit input plus one block recomputed at a time; the final norm
    and the output head's input; then the logits:
    the fp32 copy the loss keeps and the fp32 gradient the backward pass starts from, which at a 32k
    vocabulary is often the largest single term.
    """
    scale = 2 if precision == "fp32" else 1
    tokens = micro_batch * seq_len
    per_d, per_ff = BLOCK_BYTES_PER_TOKEN.get(shape.arch, BLOCK_BYTES_PER_TOKEN["llama"])
    block = tokens * (per_d * shape.d_model + per_ff * (shape.ff or 4 * shape.d_model)) * scale
    kept = shape.n_layers * 2 * tokens * shape.d_model * scale + block if checkpointing else shape.n_layers * block
    return int(kept + tokens * shape.d_model * 6 * scale + tokens * shape.vocab * 8)  # final norm, head input


def gpu_memory(shape: ModelShape, setting: MemorySetting, seq_len: int, gpus_per_node: int, nodes: int,
               precision: str = "bf16") -> MemoryEstimate:
    """Model states (the trainable part through DeepSpeed's estimators, frozen 16-bit weights beside them,
    partitioned only by ZeRO-3) plus activations, per GPU."""
    largest = min(shape.largest_layer, shape.trainable) if shape.trainable < shape.total else shape.largest_layer
    gpu, cpu = model_states_bytes(shape.trainable, largest, setting, gpus_per_node, nodes)
    frozen = shape.total - shape.trainable
    if frozen:
        if setting.zero_stage == 3:
            gpu += 0 if setting.offload_params else 2 * frozen // max(1, gpus_per_node * nodes)
        else:
            gpu += 2 * frozen
    act = activation_bytes(shape, setting.micro_batch_size, seq_len, setting.gradient_checkpointing, precision)
    return MemoryEstimate(model_states=int(gpu), activations=act, cpu_per_node=int(cpu))


ZERO_OPTIONS: tuple[MemorySetting, ...] = (
    MemorySetting(0), MemorySetting(1), MemorySetting(1, offload_optimizer=True), MemorySetting(2),
    MemorySetting(2, offload_optimizer=True), MemorySetting(3), MemorySetting(3, offload_optimizer=True),
    MemorySetting(3, offload_optimizer=True, offload_params=True),
)
"""The rows of the plan's memory table: every ZeRO stage, with and without CPU offload."""


def _cost(cur: MemorySetting, new: MemorySetting) -> float:
    """How much a change slows training, roughly: a higher ZeRO stage costs communication only; each halving
    of the micro batch (grad_accum raised to keep the global batch) some efficiency; recomputing activations
    about a third more compute; CPU offload most of all (optimizer steps on the CPU, then parameters over PCIe)."""
    halvings = max(0, cur.micro_batch_size.bit_length() - new.micro_batch_size.bit_length())
    return (0.5 * max(0, new.zero_stage - cur.zero_stage) + halvings
            + 2 * (new.gradient_checkpointing and not cur.gradient_checkpointing)
            + 4 * (new.offload_optimizer and not cur.offload_optimizer)
            + 8 * (new.offload_params and not cur.offload_params))


def _candidates(cur: MemorySetting) -> list[MemorySetting]:
    """Every setting that saves memory over `cur` (never undoing what it already does), cheapest first."""
    micros = [m for m in (cur.micro_batch_size >> k for k in range(cur.micro_batch_size.bit_length()))
              if m >= 1 and cur.micro_batch_size % m == 0]
    out = [MemorySetting(z.zero_stage, z.offload_optimizer or cur.offload_optimizer and z.zero_stage > 0,
                         z.offload_params or cur.offload_params and z.zero_stage == 3, m, ckpt)
           for z in ZERO_OPTIONS if z.zero_stage >= cur.zero_stage
           for m in micros for ckpt in {cur.gradient_checkpointing, True}]
    return sorted({c for c in out if c != cur}, key=lambda c: (_cost(cur, c), -c.micro_batch_size, c.zero_stage))


def fits(estimate: MemoryEstimate, setting: MemorySetting, capacity: float, cpu_capacity: float | None) -> bool:
    """Within a GPU's `capacity` bytes and, when states are offloaded, within the node's `cpu_capacity`
    (None: unknown, not checked)."""
    offloaded = setting.offload_optimizer or setting.offload_params
    return estimate.total <= capacity and not (offloaded and cpu_capacity is not None
                                               and estimate.cpu_per_node > cpu_capacity)


def smallest_fit(shape: ModelShape, cur: MemorySetting, seq_len: int, gpus_per_node: int, nodes: int,
                 capacity: float, precision: str = "bf16", cpu_capacity: float | None = None) -> dict[str, Any] | None:
    """The cheapest change (`_cost`) under which the estimate `fits`, as the fields that differ; None when
    nothing does. A micro batch change comes with the `grad_accum_factor` that keeps the global batch.

    Eight parameters because they are `gpu_memory`'s five plus `fits`' budget, passed through unchanged;
    a bundle of them would be a second name for each.

    Args:
        shape: the model.
        cur: the configured memory setting (ZeRO stage, offload, micro batch, checkpointing).
        seq_len: tokens per sequence.
        gpus_per_node: GPUs of one node (ZeRO partitions over them all).
        nodes: nodes the stage spans.
        capacity: GiB of one GPU available to the stage.
        precision: bf16, fp16 or fp32.
        cpu_capacity: GiB of node RAM for offloaded states (None: not checked).
    """
    for trial in _candidates(cur):
        if fits(gpu_memory(shape, trial, seq_len, gpus_per_node, nodes, precision), trial, capacity, cpu_capacity):
            change: dict[str, Any] = {k: v for k, v in asdict(trial).items() if v != getattr(cur, k)}
            if "micro_batch_size" in change:
                change["grad_accum_factor"] = cur.micro_batch_size // trial.micro_batch_size
            return change
    return None
