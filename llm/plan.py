"""`llmray plan`: derived sizing per stage plus the run's arithmetic and a wall-time estimate."""

from __future__ import annotations

from typing import Any

from llm.config import STAGE_SECTIONS, LoadedConfig, ModelConfig
from llm.hardware import GPU_PEAK_TFLOPS
from llm.sizing import Sizing, derive


def param_counts(model: ModelConfig, vocab: int) -> dict[str, int]:
    """Parameter counts of the model a `ModelConfig` builds, computed from its shapes.

    `total` is what the model holds; `compute` is what costs FLOPs per token: every matmul weight,
    the output projection included even when tied, and no embedding lookups (Kaplan et al. 2020).
    """
    d, layers, ff = model.d_model, model.n_layers, model.ff_width()
    if model.arch == "gpt2":
        block = (d * 3 * d + 3 * d) + (d * d + d) + (2 * d * ff + ff + d) + 4 * d
        embed = vocab * d + model.context * d
        total = embed + layers * block + 2 * d + (0 if model.tie_embeddings else vocab * d)
        matmuls = layers * (4 * d * d + 2 * d * ff)
    else:
        kv = d // model.n_heads * (model.n_kv_heads or model.n_heads)
        block = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
        embed = vocab * d
        total = embed + layers * block + d + (0 if model.tie_embeddings else vocab * d)
        matmuls = layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    return {"total": total, "compute": matmuls + vocab * d}


def flops_per_token(model: ModelConfig, vocab: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N plus the attention term 12 * layers * d_model * seq_len (PaLM, app. B)."""
    n = param_counts(model, vocab)["compute"]
    return 6.0 * n + 12.0 * model.n_layers * model.d_model * seq_len


def build_plan(loaded: LoadedConfig, sizing: Sizing | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready mapping."""
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
        "params": param_counts(pre.model, vocab)["total"] if pre.model.path is None else None,
        "global_batch_sequences": global_batch,
        "tokens_per_step": tokens_per_step,
        "steps": pre.max_steps,
        "tokens": tokens_per_step * pre.max_steps,
        "flops_per_token": fpt,
        "total_flops": total_flops,
    }
    estimate: dict[str, Any] | None = None
    if sizing.pretrain.use_gpu and sizing.gpu_model in GPU_PEAK_TFLOPS:
        peak = GPU_PEAK_TFLOPS[sizing.gpu_model] * 1e12
        seconds = total_flops / (sizing.pretrain.workers * peak * cfg.plan.mfu)
        estimate = {
            "gpu": sizing.gpu_model,
            "peak_tflops_per_gpu": GPU_PEAK_TFLOPS[sizing.gpu_model],
            "mfu_assumed": cfg.plan.mfu,
            "wall_hours": seconds / 3600,
            "gpu_hours": seconds * sizing.pretrain.workers / 3600,
        }
    return {
        "config": str(loaded.path),
        "run": cfg.run,
        "storage": cfg.storage,
        "stages": {s: getattr(cfg, s).enabled for s in STAGE_SECTIONS},
        "sizing": sizing.as_dict(),
        "pretrain": arithmetic,
        "estimate": estimate,
    }


def format_plan(plan: dict[str, Any]) -> str:
    """One screen of plan for people."""
    s, a, e = plan["sizing"], plan["pretrain"], plan["estimate"]

    def train(t: dict[str, Any]) -> str:
        dev = "GPU" if t["use_gpu"] else "CPU"
        return f"{t['workers']} {dev} workers x {t['cpus_per_worker']:g} CPU"

    lines = [
        f"run {plan['run']} -> {plan['storage']}/{plan['run']}/   ({plan['config']})",
        "stages: " + "  ".join(f"{k}{'' if v else ' (off)'}" for k, v in plan["stages"].items()),
        f"cluster at most: {s['cluster_cpus']:g} CPUs, {s['cluster_gpus']:g} GPUs"
        + (f" ({s['gpu_model']})" if s["gpu_model"] else ""),
        f"  data      parallelism {s['data_parallelism']}",
        f"  pretrain  {train(s['pretrain'])}",
        f"  finetune  {train(s['finetune'])}",
        f"  sweep     {s['sweep_concurrent_trials']} trials at once, each {train(s['sweep_trial'])}",
        f"  serve     replicas {s['serve_min_replicas']}..{s['serve_max_replicas']}",
        *(f"  note: {n}" for n in s["notes"]),
        "pretrain arithmetic:",
        f"  params {a['params']:,}" if a["params"] else "  params: from the local model directory",
        f"  {a['global_batch_sequences']} sequences x seq_len = {a['tokens_per_step']:,} tokens/step"
        f" x {a['steps']:,} steps = {a['tokens']:,} tokens",
        f"  {a['flops_per_token']:.3g} FLOPs/token, {a['total_flops']:.3g} FLOPs in all",
    ]
    if e:
        lines.append(
            f"  estimate on {e['gpu']} ({e['peak_tflops_per_gpu']:g} TFLOP/s bf16) at {e['mfu_assumed']:.0%} MFU: "
            f"{e['wall_hours']:.2f} h wall, {e['gpu_hours']:.1f} GPU-hours"
        )
    return "\n".join(lines)
