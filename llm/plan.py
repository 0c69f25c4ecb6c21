"""`llmray plan`: derived sizing per stage, the run's arithmetic, and what a cloud run will cost.

For every GPU training stage: nodes, wall time at the assumed MFU, GPU-hours and cost from an hourly
price per node type; and the memory each GPU needs per ZeRO stage (`llm.memory.gpu_memory`), with the
smallest change that fits when the configured one does not. Prices, MFU and the memory model are
estimates and the output says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from llm.config import LoadedConfig, ModelConfig, PipelineConfig, TrainConfig
from llm.flops import training_flops_per_token
from llm.hardware import DEFAULT_PRICES, GPU_MEMORY_GIB, GPU_PEAK_TFLOPS, INSTANCE_GPU_MEMORY_GIB, INSTANCE_RAM_GIB
from llm.memory import (
    USABLE_CPU_FRACTION,
    USABLE_GPU_FRACTION,
    ZERO_OPTIONS,
    MemorySetting,
    ModelShape,
    fits,
    gpu_memory,
    smallest_fit,
)
from llm.sizing import Sizing, derive

GIB = 2**30



@dataclass(frozen=True)
class TrainingRun:
    """One GPU training stage as the plan sees it (a sweep counts `runs` trials, `concurrent` at once)."""

    stage: str
    section: TrainConfig
    shape: ModelShape | None
    """The model's shapes; None when its directory is not readable here (time and memory show as n/a)."""
    workers: int
    steps: int
    seq_len: int
    prefix: str
    """The dotted override prefix of the section (`pretrain.`, `compress.distill.`)."""
    method: str = "full"
    runs: int = 1
    concurrent: int = 1
    teacher: ModelShape | None = None
    """The frozen teacher of a distillation (its forward pass and logits cost too)."""

    @property
    def tokens_per_run(self) -> int:
        s = self.section
        return self.steps * s.micro_batch_size * s.grad_accum * max(1, self.workers) * self.seq_len

    @property
    def flops_per_token(self) -> float | None:
        if self.shape is None:
            return None
        fpt = training_flops_per_token(self.shape.compute, self.shape.n_layers, self.shape.d_model, self.seq_len,
                                       self.method)
        return fpt + (2.0 * self.teacher.compute if self.teacher else 0.0)  # the teacher's forward pass


def param_counts(model: ModelConfig, vocab: int) -> dict[str, int]:
    """Parameter counts of the model a `ModelConfig` builds, computed from its shapes.

    `total` is what the model holds; `compute` is what costs FLOPs per token: every matmul weight,
    the output projection included even when tied, and no embedding lookups (Kaplan et al. 2020).
    """
    d, layers, ff = model.d_model, model.n_layers, model.ff_width()
    if model.family == "gpt2":
        block = (d * 3 * d + 3 * d) + (d * d + d) + (2 * d * ff + ff + d) + 4 * d
        embed = vocab * d + model.context * d
        total = embed + layers * block + 2 * d + (0 if model.tie_embeddings else vocab * d)
        matmuls = layers * (4 * d * d + 2 * d * ff)
        return {"total": total, "compute": matmuls + vocab * d}
    head_dim, q, kv = _heads(model)
    matmul = 2 * d * q + 2 * d * kv + 3 * d * ff  # q, o; k, v; gate, up, down (Phi-3 fuses them: same sizes)
    block = matmul + 2 * d + _FAMILY_EXTRA.get(model.family, lambda d, q, kv, hd: 0)(d, q, kv, head_dim)
    total = vocab * d + layers * block + d + (0 if model.tie_embeddings else vocab * d)
    return {"total": total, "compute": layers * matmul + vocab * d}


_FAMILY_EXTRA = {  # parameters of a block beyond the Llama layout's (d: width, q / kv: q and kv widths)
    "qwen2": lambda d, q, kv, hd: q + 2 * kv,  # q, k, v biases
    "qwen3": lambda d, q, kv, hd: 2 * hd,  # per-head q_norm, k_norm
    "olmo2": lambda d, q, kv, hd: q + kv,  # whole-projection q_norm, k_norm
    "gemma2": lambda d, q, kv, hd: 2 * d,  # norms before and after attention and MLP: four, not two
    "gemma3": lambda d, q, kv, hd: 2 * d + 2 * hd,  # Gemma 2's norms and per-head q_norm, k_norm
}


def _heads(model: ModelConfig) -> tuple[int, int, int]:
    """`head_dim`, the width of q (`n_heads x head_dim`) and of k and v each (`n_kv_heads x head_dim`)."""
    head_dim = int(model.config.get("head_dim", model.d_model // model.n_heads))
    return head_dim, model.n_heads * head_dim, (model.n_kv_heads or model.n_heads) * head_dim


def built_here(model: ModelConfig) -> bool:
    """Whether the shape fields describe the model (not a directory's or a config file's)."""
    return model.path is None and model.config_file is None


def flops_per_token(model: ModelConfig, vocab: int, seq_len: int, method: str = "full") -> float:
    """Training FLOPs per token: 6N (4N for LoRA) plus the attention term 12 x layers x d_model x seq_len
    (PaLM, app. B)."""
    return training_flops_per_token(param_counts(model, vocab)["compute"], model.n_layers, model.d_model, seq_len,
                                    method)


def model_shape(model: ModelConfig, vocab: int, lora_rank: int | None = None) -> ModelShape:
    """The memory estimate's view of a model built from a config; with `lora_rank`, only adapters on every
    linear layer of the blocks train (the stage's default targets)."""
    total = param_counts(model, vocab)["total"]
    d, ff = model.d_model, model.ff_width()
    _, q, kv = _heads(model)
    largest = max(vocab * d, d * ff + ff, 3 * d * d + 3 * d)
    trainable = total
    if lora_rank:
        if model.family == "gpt2":  # c_attn (d -> 3d), c_proj (d -> d), c_fc (d -> ff), mlp c_proj (ff -> d)
            per_layer = (d + 3 * d) + 2 * d + 2 * (d + ff)
        elif model.family == "phi3":  # qkv_proj (d -> q + 2kv), o (q -> d), gate_up (d -> 2ff), down (ff -> d)
            per_layer = (d + q + 2 * kv) + (q + d) + (d + 2 * ff) + (ff + d)
        else:  # q (d -> q), o (q -> d); k, v (d -> kv); gate, up (d -> ff); down (ff -> d)
            per_layer = 2 * (d + q) + 2 * (d + kv) + 3 * (d + ff)
        trainable = model.n_layers * lora_rank * per_layer
    return ModelShape(total=total, trainable=trainable, largest_layer=largest, n_layers=model.n_layers,
                      d_model=d, vocab=vocab, compute=param_counts(model, vocab)["compute"], ff=ff,
                      arch="gpt2" if model.family == "gpt2" else "llama")


def dir_shape(path: str, lora_rank: int | None = None, targets: list[str] | None = None) -> ModelShape | None:
    """The shape of a local Hugging Face model directory (or of a `config.json` file), from its config on the
    meta device (no weights read, nothing allocated); None when it is not readable here (e.g. it exists on
    the cluster)."""
    from pathlib import Path

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() and not (folder.name.endswith(".json") and folder.is_file()):
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    conf = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head = model.get_output_embeddings()
    linears = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    matmuls = sum(m.weight.numel() for _, m in linears) + head.weight.numel()
    trainable = total
    if lora_rank:
        trainable = sum(lora_rank * sum(m.weight.shape) for leaf, m in linears if not targets or leaf in targets)
    text = conf.get_text_config()
    d = text.hidden_size
    ff = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d
    return ModelShape(total=total, trainable=trainable, largest_layer=largest, d_model=d,
                      n_layers=text.num_hidden_layers, vocab=head.weight.shape[0], compute=matmuls, ff=ff,
                      arch="gpt2" if conf.model_type == "gpt2" else "llama")


def _pruned(model: ModelConfig, cfg: PipelineConfig) -> ModelConfig:
    """The pruned student's shape, MLP channels only (head pruning makes it smaller still: an upper bound)."""
    p = cfg.compress.prune
    kept = max(p.multiple_of, round(model.ff_width() * (1 - p.mlp_ratio) / p.multiple_of) * p.multiple_of)
    return model.model_copy(update={"d_ff": kept})


def _gpu_hardware(loaded: LoadedConfig, sizing: Sizing) -> dict[str, Any] | None:
    """The GPU node type's name, instance, GPUs per node, peak FLOP/s and memory; None without GPUs."""
    cfg, cluster = loaded.llm, loaded.cluster
    types = cluster.get("available_node_types") or {}
    local = (cluster.get("provider") or {}).get("type") == "local" or not types
    gpu_types = [(n, s) for n, s in types.items() if (s.get("resources") or {}).get("GPU")]
    if local or not gpu_types:
        if not sizing.cluster_gpus:
            return None
        spec: dict[str, Any] = {}
        name, instance, per_node = "local", None, int(sizing.cluster_gpus)
    else:
        name, spec = gpu_types[0]
        instance = (spec.get("node_config") or {}).get("InstanceType")
        per_node = int(spec["resources"]["GPU"])
    model = cfg.plan.gpu or sizing.gpu_model
    peak = cfg.plan.peak_tflops or (GPU_PEAK_TFLOPS.get(model) if model else None)
    memory = cfg.plan.gpu_memory_gib or next(
        (v for k, v in sorted(INSTANCE_GPU_MEMORY_GIB.items(), key=lambda kv: -len(kv[0]))
         if instance and instance.startswith(k)), None) or (GPU_MEMORY_GIB.get(model) if model else None)
    ram = (spec.get("resources") or {}).get("memory")
    ram_gib = ram / GIB if ram else INSTANCE_RAM_GIB.get(instance or "")
    return {"node_type": name, "instance": instance, "gpus_per_node": per_node, "gpu": model,
            "peak_tflops": peak, "memory_gib": memory, "node_ram_gib": ram_gib, "local": local}


def _price(cfg: PipelineConfig, node_type: str | None, instance: str | None) -> tuple[float | None, str]:
    """USD per hour of one node and where it came from: `configured` or `estimate`."""
    for key in (node_type, instance):
        if key is not None and key in cfg.plan.prices:
            return cfg.plan.prices[key], "configured"
    if instance in DEFAULT_PRICES:
        return DEFAULT_PRICES[instance], "estimate"
    return None, "unknown"


def _head(loaded: LoadedConfig) -> tuple[str | None, str | None]:
    head = loaded.cluster.get("head_node_type")
    spec = (loaded.cluster.get("available_node_types") or {}).get(head) or {}
    return head, (spec.get("node_config") or {}).get("InstanceType")


def _training_stages(loaded: LoadedConfig, sizing: Sizing) -> list[TrainingRun]:
    """Each enabled GPU training stage: its section, model shape, workers, tokens, FLOPs and override prefix.
    A model directory that is not readable here has no shape (its time and memory show as n/a)."""
    cfg = loaded.llm
    vocab, seq, sft_len = cfg.data.tokenizer.vocab_size, cfg.data.seq_len, cfg.data.sft.max_len
    pre, fin = cfg.pretrain, cfg.finetune
    built = pre.model if built_here(pre.model) else None
    pre_dir = pre.model.path or pre.model.config_file or ""  # a config.json file is read like its directory
    pre_shape = model_shape(built, vocab) if built else dir_shape(pre_dir)
    lora = fin.lora.rank if fin.method == "lora" else None
    out: list[TrainingRun] = []

    def base_shape(rank: int | None = None) -> ModelShape | None:
        if fin.base is not None:
            return dir_shape(fin.base, rank, fin.lora.target_modules)
        if built is not None:
            return model_shape(built, vocab, rank) if not (rank and fin.lora.target_modules) else None
        return dir_shape(pre_dir, rank, fin.lora.target_modules)

    if cfg.sweep.enabled:
        target = getattr(cfg, cfg.sweep.target)
        trials = (len(cfg.sweep.space.kind) * cfg.sweep.grid_peaks if cfg.sweep.search == "grid"
                  else cfg.sweep.num_trials)
        on_pre = cfg.sweep.target == "pretrain"
        out.append(TrainingRun("sweep", target, pre_shape if on_pre else base_shape(lora), sizing.sweep_trial.workers,
                               cfg.sweep.max_steps, seq if on_pre else fin.max_len or sft_len, f"{cfg.sweep.target}.",
                               method="full" if on_pre else fin.method, runs=trials,
                               concurrent=sizing.sweep_concurrent_trials))
    if pre.enabled:
        out.append(TrainingRun("pretrain", pre, pre_shape, sizing.pretrain.workers, pre.max_steps, seq, "pretrain."))
    if fin.enabled:
        out.append(TrainingRun("finetune", fin, base_shape(lora), sizing.finetune.workers, fin.max_steps,
                               fin.max_len or sft_len, "finetune.", method=fin.method))
    distilled = [v for v in cfg.compress.variants if "distilled" in v]
    teacher = base_shape()
    if cfg.compress.enabled and distilled:
        dist = cfg.compress.distill
        if "student-distilled" in distilled and dist.student:
            student: ModelShape | None = model_shape(dist.student, vocab)
        elif fin.base is None and built is not None:
            student = model_shape(_pruned(built, cfg), vocab)
        else:
            student = teacher  # the pruned directory's shape is known only after pruning: an upper bound
        out.append(TrainingRun("compress", dist, student if teacher else None, sizing.compress.workers,
                               dist.max_steps, seq, "compress.distill.", teacher=teacher))
    return out


def _time_and_cost(run: TrainingRun, hw: dict[str, Any], cfg: PipelineConfig, head_price: float | None,
                   node_price: float | None) -> dict[str, Any]:
    concurrent = max(1, min(run.concurrent, run.runs))
    gpus_at_once = max(1, run.workers) * concurrent
    nodes = math.ceil(gpus_at_once / hw["gpus_per_node"])
    row: dict[str, Any] = {"stage": run.stage, "workers": run.workers, "runs": run.runs,
                           "gpu_nodes": nodes, "tokens": run.tokens_per_run * run.runs}
    if run.flops_per_token is None or not hw["peak_tflops"]:
        return {**row, "wall_hours": None, "gpu_hours": None, "cost_usd": None}
    per_run_s = run.tokens_per_run * run.flops_per_token / (
        max(1, run.workers) * hw["peak_tflops"] * 1e12 * cfg.plan.mfu)
    hours = per_run_s * math.ceil(run.runs / concurrent) / 3600
    cost = None
    if node_price is not None and not hw["local"]:
        cost = hours * (nodes * node_price + (head_price or 0.0))
    return {**row, "flops": run.tokens_per_run * run.runs * run.flops_per_token, "wall_hours": hours,
            "gpu_hours": hours * nodes * hw["gpus_per_node"], "cost_usd": cost}


def _memory(run: TrainingRun, cfg: PipelineConfig, hw: dict[str, Any] | None) -> dict[str, Any] | None:
    """The configured setting's estimate per GPU, its fit, the smallest change that fits, and every ZeRO row."""
    shape: ModelShape | None = run.shape
    if shape is None:
        return None
    s: TrainConfig = run.section
    vocab = shape.vocab
    per_node = min(max(1, run.workers), hw["gpus_per_node"]) if hw else 1
    nodes = math.ceil(max(1, run.workers) / per_node)
    extra = 0
    if run.teacher is not None:  # distillation holds the fp32 teacher and its fp32 logits on every GPU
        extra = 4 * run.teacher.total + 4 * s.micro_batch_size * run.seq_len * vocab
    setting = MemorySetting(s.zero_stage, s.offload_optimizer, s.offload_params, s.micro_batch_size,
                            s.gradient_checkpointing)

    capacity = hw["memory_gib"] * USABLE_GPU_FRACTION * GIB if hw and hw["memory_gib"] else None
    ram = hw["node_ram_gib"] * USABLE_CPU_FRACTION * GIB if hw and hw["node_ram_gib"] else None

    def estimate(m: MemorySetting) -> dict[str, Any]:
        e = gpu_memory(shape, m, run.seq_len, per_node, nodes, s.precision)
        e = replace(e, model_states=e.model_states + extra)
        return {"setting": m.label, "states_gib": e.model_states / GIB, "activations_gib": e.activations / GIB,
                "total_gib": e.total / GIB, "cpu_per_node_gib": e.cpu_per_node / GIB,
                "fits": None if capacity is None else fits(e, m, capacity, ram)}

    result: dict[str, Any] = {"stage": run.stage, "params": shape.total, "trainable": shape.trainable,
                              "capacity_gib": capacity / GIB if capacity else None,
                              "cpu_capacity_gib": ram / GIB if ram else None, **estimate(setting), "change": None}
    result["zero_table"] = [{"configured": o.label == setting.label,
                             **estimate(replace(o, micro_batch_size=s.micro_batch_size,
                                                gradient_checkpointing=s.gradient_checkpointing))}
                            for o in ZERO_OPTIONS]
    if result["fits"] is False and capacity is not None:
        change = smallest_fit(shape, setting, run.seq_len, per_node, nodes, capacity - extra, s.precision, ram)
        result["change"] = None if change is None else _overrides(change, run.prefix, s)
    return result


def _overrides(change: dict[str, Any], prefix: str, section: TrainConfig) -> list[str]:
    """A change as the dotted overrides a user can paste (grad_accum raised to keep the global batch)."""
    out = []
    for key, value in change.items():
        if key == "grad_accum_factor":
            out.append(f"{prefix}grad_accum={section.grad_accum * value}")
        else:
            out.append(f"{prefix}{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def build_plan(loaded: LoadedConfig, sizing: Sizing | None = None,
               enabled: dict[str, bool] | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready mapping; `enabled` (stage name -> enabled, from the registry) is listed as
    given."""
    cfg = loaded.llm
    sizing = sizing or derive(loaded)
    pre = cfg.pretrain
    vocab = cfg.data.tokenizer.vocab_size
    replicas = max(1, sizing.pretrain.workers)
    global_batch = pre.micro_batch_size * pre.grad_accum * replicas
    tokens_per_step = global_batch * cfg.data.seq_len
    fpt = flops_per_token(pre.model, vocab, cfg.data.seq_len)
    total_flops = fpt * tokens_per_step * pre.max_steps
    arithmetic: dict[str, Any] = {
        "params": param_counts(pre.model, vocab)["total"] if built_here(pre.model) else None,
        "global_batch_sequences": global_batch,
        "tokens_per_step": tokens_per_step,
        "steps": pre.max_steps,
        "tokens": tokens_per_step * pre.max_steps,
        "flops_per_token": fpt,
        "total_flops": total_flops,
    }
    hw = _gpu_hardware(loaded, sizing)
    runs = _training_stages(loaded, sizing)
    head, head_instance = _head(loaded)
    head_price, head_src = _price(cfg, head, head_instance)
    node_price, node_src = _price(cfg, hw["node_type"], hw["instance"]) if hw else (None, "unknown")
    stages = [_time_and_cost(r, hw, cfg, head_price, node_price) for r in runs] if hw else []
    estimate: dict[str, Any] | None = None
    pre_row = next((r for r in stages if r["stage"] == "pretrain"), None)
    if hw and sizing.pretrain.use_gpu and pre_row and pre_row["wall_hours"] is not None:
        estimate = {"gpu": hw["gpu"], "peak_tflops_per_gpu": hw["peak_tflops"], "mfu_assumed": cfg.plan.mfu,
                    "wall_hours": pre_row["wall_hours"], "gpu_hours": pre_row["gpu_hours"],
                    "cost_usd": pre_row["cost_usd"]}
    known = [r for r in stages if r["wall_hours"] is not None]
    total = {"wall_hours": sum(r["wall_hours"] for r in known), "gpu_hours": sum(r["gpu_hours"] for r in known),
             "cost_usd": (sum(r["cost_usd"] for r in known)
                          if known and all(r["cost_usd"] is not None for r in known) else None),
             "leaves_out": [r["stage"] for r in stages if r["wall_hours"] is None]}
    serve_per_hour = None
    if hw and node_price is not None and not hw["local"] and cfg.serve.enabled:
        def per_hour(n: int) -> float:
            return math.ceil(n / hw["gpus_per_node"]) * node_price + (head_price or 0.0)
        serve_per_hour = [per_hour(sizing.serve_min_replicas), per_hour(sizing.serve_max_replicas)]
    return {
        "config": str(loaded.path),
        "run": cfg.run,
        "storage": cfg.storage,
        "stages": enabled or {},
        "sizing": sizing.as_dict(),
        "pretrain": arithmetic,
        "estimate": estimate,
        "hardware": hw,
        "mfu": cfg.plan.mfu,
        "prices": {"head": head, "head_instance": head_instance, "head_usd_per_hour": head_price,
                   "head_source": head_src, "gpu_node_usd_per_hour": node_price, "gpu_node_source": node_src},
        "training": stages,
        "total": total,
        "serve_usd_per_hour": serve_per_hour,
        "memory": [m for m in (_memory(r, cfg, hw) for r in runs if (hw or r.stage == "pretrain")) if m],
    }
