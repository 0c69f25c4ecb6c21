"""`llmray plan`'s one screen: the plan `llm.plan.build_plan` returns, as aligned text."""

from __future__ import annotations

from typing import Any


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _hours(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 60:.1f} min" if value < 1 else f"{value:.2f} h"


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _time_lines(plan: dict[str, Any]) -> list[str]:
    hw, p, rows = plan["hardware"], plan["prices"], plan["training"]
    if hw is None:
        return ["time and cost: no GPUs in the node types, training runs on CPU: wall time and cost n/a "
                "(measure a CPU run with bench/train.py)"]
    if not hw["peak_tflops"]:
        return [f"time and cost: n/a, the GPU of node type {hw['node_type']} is unknown: set plan.gpu "
                "(or plan.peak_tflops and plan.gpu_memory_gib)"]
    price = ("no cloud cost (local provider)" if hw["local"] else
             f"{hw['instance']} ${_num(p['gpu_node_usd_per_hour'], '.2f')}/h ({p['gpu_node_source']}), "
             f"head {p['head_instance']} ${_num(p['head_usd_per_hour'], '.3f')}/h ({p['head_source']}); "
             "set plan.prices.<node type>")
    lines = [f"time and cost, ESTIMATES at an assumed {plan['mfu']:.0%} MFU (plan.mfu) of {hw['gpu']} "
             f"{hw['peak_tflops']:g} TFLOP/s bf16", f"  prices: {price}",
             f"  {'stage':<9} {'runs':>4} {'GPU nodes':>9} {'tokens':>10} {'wall':>9} {'GPU-h':>8} {'cost $':>10}"]
    for r in rows:
        lines.append(f"  {r['stage']:<9} {r['runs']:>4} {r['gpu_nodes']:>9} {r['tokens']:>10.3g} "
                     f"{_hours(r['wall_hours']):>9} {_num(r['gpu_hours'], '.1f'):>8} {_usd(r['cost_usd']):>10}")
    t = plan["total"]
    lines.append(f"  {'total':<9} {'':>4} {'':>9} {'':>10} {_hours(t['wall_hours']):>9} "
                 f"{t['gpu_hours']:>8.1f} {_usd(t['cost_usd']):>10}")
    if t["leaves_out"]:
        lines.append(f"  total leaves out {', '.join(t['leaves_out'])}: a model directory not readable here")
    if any(r["stage"] == "sweep" for r in rows):
        lines.append("  sweep: every trial run to its max_steps (ASHA stops most earlier: an upper bound)")
    if plan["serve_usd_per_hour"]:
        low, high = plan["serve_usd_per_hour"]
        lines.append(f"  serve: ${low:,.2f}/h at min replicas .. ${high:,.2f}/h at max, while it runs")
    lines.append("  compute time only: node start-up, data loading, checkpoints, evaluations come on top;")
    lines.append("  the data stage's CPU time depends on the corpus (not estimated)")
    return lines


def _memory_lines(plan: dict[str, Any]) -> list[str]:
    mem = plan["memory"]
    if not mem:
        return []
    first = next((m for m in mem if m["stage"] == "pretrain"), mem[0])
    cap = first["capacity_gib"]
    hw = plan["hardware"]
    where = f"{cap:.0f} of {hw['memory_gib']:g} GiB usable" if cap else "no GPU memory to compare"
    unit = "GPU" if hw else "worker"
    lines = [f"memory per {unit}, {first['stage']}, ESTIMATES ({where}; model states: DeepSpeed's estimators,",
             "  activations: autograd's saved tensors per block, measured on HF blocks with SDPA, + logits)",
             f"  {'':1} {'setting':<25} {'states':>8} {'activ.':>8} {'total':>8} {'CPU/node':>9}  fits"]
    for row in first["zero_table"]:
        fits = {None: "n/a", True: "yes", False: "NO"}[row["fits"]]
        lines.append(f"  {'*' if row['configured'] else ' '} {row['setting']:<25} {row['states_gib']:>8.2f} "
                     f"{row['activations_gib']:>8.2f} {row['total_gib']:>8.2f} {row['cpu_per_node_gib']:>9.1f}  {fits}")
    for m in mem:
        head = f"  {m['stage']}: {m['setting']} needs {m['total_gib']:.2f} GiB per {unit}"
        if m["fits"] is None:
            lines.append(f"{head} (no GPU memory to compare)")
        elif m["fits"]:
            lines.append(f"{head} of {cap:.0f}: fits")
        elif m["change"]:
            lines.append(f"WARNING: {m['stage']}: {m['setting']} needs {m['total_gib']:.1f} GiB per GPU, "
                         f"{cap:.0f} usable; smallest change that fits: {' '.join(m['change'])}")
        else:
            lines.append(f"WARNING: {m['stage']}: {m['total_gib']:.1f} GiB per GPU, {cap:.0f} usable, and no "
                         "ZeRO stage, offload, micro batch or checkpointing fits: a larger GPU or a smaller model"
                         + (" (or more GPUs per trial: sweep.sizing.workers)" if m["stage"] == "sweep" else ""))
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """One screen of plan for people."""
    s, a = plan["sizing"], plan["pretrain"]

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
        *_time_lines(plan),
        *_memory_lines(plan),
    ]
    return "\n".join(lines)
