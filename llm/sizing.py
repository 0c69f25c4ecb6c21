"""Sizing derived from the cluster's node types: train workers, Data parallelism, trials, replicas.

The node types are the one sizing source (DESIGN.md); each stage may override through its `sizing`
section. `check_live` compares the derived figures with a connected cluster's resources.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from llm.config import LoadedConfig, PipelineConfig, SizingOverride
from llm.hardware import gpu_model_of_instance


@dataclass(frozen=True)
class NodeShape:
    """One node type, with the most nodes of it the cluster may have."""

    name: str
    cpus: float
    gpus: float
    max_nodes: int
    gpu_model: str | None = None


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster offers at its largest."""

    nodes: list[NodeShape]
    local: bool

    @property
    def cpus(self) -> float:
        return sum(n.cpus * n.max_nodes for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus * n.max_nodes for n in self.nodes)

    @property
    def node_count(self) -> int:
        return sum(n.max_nodes for n in self.nodes)

    @property
    def gpu_model(self) -> str | None:
        return next((n.gpu_model for n in self.nodes if n.gpus and n.gpu_model), None)


@dataclass(frozen=True)
class TrainSizing:
    """Ray Train `ScalingConfig` figures for one training run."""

    workers: int
    cpus_per_worker: float
    use_gpu: bool
    placement_strategy: str = "PACK"

    def scaling_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ray.train.ScalingConfig`."""
        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1
        return {"num_workers": self.workers, "use_gpu": self.use_gpu, "resources_per_worker": resources,
                "placement_strategy": self.placement_strategy}


@dataclass(frozen=True)
class Sizing:
    """Every stage's derived sizing."""

    cluster_cpus: float
    cluster_gpus: float
    gpu_model: str | None
    data_parallelism: int
    pretrain: TrainSizing
    finetune: TrainSizing
    compress: TrainSizing
    """Distillation runs."""
    sweep_trial: TrainSizing
    sweep_concurrent_trials: int
    serve_min_replicas: int
    serve_max_replicas: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cluster_shape(cluster: dict[str, Any], cfg: PipelineConfig) -> ClusterShape:
    """Node shapes from `available_node_types`; a local provider is this machine (or `ray.num_cpus`)."""
    if (cluster.get("provider") or {}).get("type") == "local" or not cluster.get("available_node_types"):
        workers = len((cluster.get("provider") or {}).get("worker_ips") or [])
        cpus = float(cfg.ray.num_cpus or os.cpu_count() or 1)
        gpus = float(_local_gpus())
        return ClusterShape([NodeShape("local", cpus, gpus, 1 + workers)], local=True)
    head = cluster.get("head_node_type")
    nodes = []
    for name, spec in cluster["available_node_types"].items():
        res = spec.get("resources") or {}
        count = 1 if name == head else int(spec.get("max_workers", cluster.get("max_workers", 0)) or 0)
        instance = (spec.get("node_config") or {}).get("InstanceType")
        nodes.append(NodeShape(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)), count,
                               gpu_model_of_instance(instance)))
    return ClusterShape(nodes, local=False)


def _local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        return sum(1 for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit())
    except OSError:
        return 0


def _train_sizing(shape: ClusterShape, override: SizingOverride) -> TrainSizing:
    use_gpu = override.use_gpu if override.use_gpu is not None else shape.gpus > 0
    gpu_nodes = [n for n in shape.nodes if n.gpus > 0]
    if use_gpu:
        # One worker per GPU. Half of a GPU node's CPUs per GPU go to the worker, the rest to Ray Data.
        workers = int(shape.gpus)
        per_gpu = min((n.cpus / n.gpus for n in gpu_nodes), default=2.0)
        cpus = max(1.0, float(int(per_gpu // 2)))
    else:
        # On CPU, torch's intra-op threads already use a node's cores: one worker per node, holding
        # half the node so Ray Data's read and map tasks are never starved (seen hanging on 2 cores).
        workers = max(1, shape.node_count)
        cpus = max(1.0, float(int(min(n.cpus for n in shape.nodes) // 2)))
    return TrainSizing(
        workers=override.workers if override.workers is not None else workers,
        cpus_per_worker=override.cpus_per_worker if override.cpus_per_worker is not None else cpus,
        use_gpu=bool(use_gpu),
        placement_strategy=override.placement_strategy,
    )


def derive(loaded: LoadedConfig) -> Sizing:
    """Derive every stage's sizing from the node types and the stages' overrides."""
    cfg = loaded.llm
    shape = cluster_shape(loaded.cluster, cfg)
    pre = _train_sizing(shape, cfg.pretrain.sizing)
    fin = _train_sizing(shape, cfg.finetune.sizing)
    trial_override = cfg.sweep.sizing
    if trial_override.workers is None:
        trial_override = trial_override.model_copy(update={"workers": 1})
    trial = _train_sizing(shape, trial_override)
    if trial.use_gpu:
        fit = int(shape.gpus // max(1, trial.workers))
    else:
        fit = int(shape.cpus // max(1.0, 2 * trial.workers * trial.cpus_per_worker))
    concurrent = cfg.sweep.max_concurrent_trials or max(1, fit)
    serve_max = cfg.serve.max_replicas or max(1, int(shape.gpus) if shape.gpus else int(shape.cpus // 2))
    notes = []
    if shape.local:
        notes.append(f"local provider: sized from this machine ({shape.cpus:g} CPUs, {shape.gpus:g} GPUs)")
    return Sizing(
        cluster_cpus=shape.cpus,
        cluster_gpus=shape.gpus,
        gpu_model=cfg.plan.gpu or shape.gpu_model,
        data_parallelism=cfg.data.parallelism or max(1, int(shape.cpus)),
        pretrain=pre,
        finetune=fin,
        compress=_train_sizing(shape, cfg.compress.sizing),
        sweep_trial=trial,
        sweep_concurrent_trials=concurrent,
        serve_min_replicas=cfg.serve.min_replicas if cfg.serve.min_replicas is not None else 1,
        serve_max_replicas=serve_max,
        notes=notes,
    )


def cross_check(loaded: LoadedConfig) -> list[str]:
    """Load-time arithmetic: global batch = micro x accum x workers; GPUs asked <= GPUs offered."""
    sizing = derive(loaded)
    problems = []
    for stage, train in (("pretrain", sizing.pretrain), ("finetune", sizing.finetune)):
        section = getattr(loaded.llm, stage)
        if not section.enabled:
            continue
        replicas = max(1, train.workers)
        want = section.micro_batch_size * section.grad_accum * replicas
        if section.global_batch_size is not None and section.global_batch_size != want:
            problems.append(
                f"metadata.llm.{stage}.global_batch_size: {section.global_batch_size} != micro_batch_size "
                f"{section.micro_batch_size} x grad_accum {section.grad_accum} x workers {replicas} = {want}"
            )
        if train.use_gpu and train.workers > sizing.cluster_gpus:
            problems.append(
                f"metadata.llm.{stage}.sizing.workers: {train.workers} GPU workers asked, the node types "
                f"offer {sizing.cluster_gpus:g} GPUs"
            )
    return problems


def check_live(sizing: Sizing) -> list[str]:
    """Compare derived figures with the connected cluster's resources; one line per shortfall."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    missing = []
    for stage, train in (("pretrain", sizing.pretrain), ("finetune", sizing.finetune)):
        need_cpu = train.workers * train.cpus_per_worker
        if need_cpu > cpus:
            missing.append(f"{stage}: {train.workers} workers x {train.cpus_per_worker:g} CPU = {need_cpu:g} CPUs "
                           f"asked, cluster has {cpus:g} now")
        if train.use_gpu and train.workers > gpus:
            missing.append(f"{stage}: {train.workers} GPUs asked, cluster has {gpus:g} now "
                           f"(the autoscaler adds worker nodes up to {sizing.cluster_gpus:g} GPUs on demand)")
    return missing


def planned(cfg: PipelineConfig) -> Sizing:
    """The sizing `llmray plan` prints, from the cluster file the config was loaded with (`{}`, this
    machine, for a config built in code). Stages size themselves from this, never from the nodes that
    happen to be alive: on a cluster whose GPU nodes start on demand, only the head is up at job start."""
    return derive(LoadedConfig(path=".", cluster=cfg.cluster(), llm=cfg))


# --- Memory per GPU: model states from DeepSpeed's own estimators, plus activations ---------------------------

USABLE_GPU_FRACTION = 0.9
USABLE_CPU_FRACTION = 0.6
"""Share of a node's RAM left for offloaded ZeRO states: Ray's object store takes 30% by default, the OS,
Ray Data and the workers' own processes part of the rest."""
"""Share of a GPU's memory left for model states and activations: the CUDA context, NCCL buffers and the
caching allocator's fragmentation take the rest (a rule of thumb, not a measurement)."""


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


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool,
                     precision: str = "bf16") -> int:
    """Activations kept for the backward pass of one micro batch.

    Per layer 34 x seq x batch x d_model bytes in 16-bit (Korthikanti et al. 2022, table 2) without their
    5 x heads x seq^2 term: SDPA's fused attention keeps no score matrix. Activation checkpointing keeps
    each layer's 16-bit input and recomputes one layer at a time. The logits add 16-bit values plus the
    fp32 copy the loss takes of them, which at a 32k vocabulary is often the largest single term.
    """
    scale = 2 if precision == "fp32" else 1
    tokens = micro_batch * seq_len
    layer = 34 * tokens * shape.d_model * scale
    kept = shape.n_layers * 2 * tokens * shape.d_model * scale + layer if checkpointing else shape.n_layers * layer
    return int(kept + tokens * shape.vocab * (2 * scale + 4))


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
    nothing does. A micro batch change comes with the `grad_accum_factor` that keeps the global batch."""
    for trial in _candidates(cur):
        if fits(gpu_memory(shape, trial, seq_len, gpus_per_node, nodes, precision), trial, capacity, cpu_capacity):
            change: dict[str, Any] = {k: v for k, v in asdict(trial).items() if v != getattr(cur, k)}
            if "micro_batch_size" in change:
                change["grad_accum_factor"] = cur.micro_batch_size // trial.micro_batch_size
            return change
    return None
