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
