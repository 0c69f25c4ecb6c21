"""Fine-tuning costs, LoRA against full, measured side by side (not a pass/fail test).

    python bench/finetune.py [--steps 10] [--threads N] [--precision bf16|fp32]
    python bench/finetune.py --shape qwen2.5-0.5b [--steps 5] [--precision fp32]

A Llama-style model of ~24M parameters (or, with `--shape`, a model of a published shape with random
weights, built on the meta device from the family's own config class as bench/compress.py builds it, at
micro batch 1), padded SFT-shaped batches (labels only on the second half of each row), the same precision
(bf16 by default), micro batch and threads for every run. On CPUs without native bf16 the weight-gradient
matmuls of full fine-tuning take a slow bf16 path, which LoRA (frozen base weights) never runs:
`--precision fp32` shows the ratios without that effect. Each run is its own fresh process, so peak memory
is that of one training worker: the growth of the process's resident set from just before the model is
loaded to the end of training (`llm.eval.PeakMemory`), i.e. weights, DeepSpeed's copies, gradients,
optimizer state and activations. Step times are medians after warm-up.

- `ours full` / `ours lora`: the one loop (`llm.train.loop.run_loop`, DeepSpeed ZeRO-2, world size 1,
  in-process runtime: Ray Train runs this same function in its workers).
- `plain lora`: what a PyTorch user writes: `peft.get_peft_model`, torch AdamW over the trainable
  parameters, bf16 autocast, gradient clipping, the same batches already in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB, SEQ, MICRO, WARMUP = 8192, 256, 4, 2
MODEL = {"arch": "llama", "n_layers": 6, "d_model": 512, "n_heads": 8, "context": SEQ}
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None}
SHAPE: str | None = None
"""`--shape`: a published shape from bench/compress.py's `SHAPES` (its vocabulary, micro batch 1)."""


def use_shape(name: str | None) -> None:
    global SHAPE, VOCAB, MICRO
    if name:
        from bench.compress import SHAPES

        SHAPE, VOCAB, MICRO = name, SHAPES[name]["vocab"], 1


def _setup(root: Path) -> tuple[Path, list[str]]:
    """The base model directory and SFT-shaped parquet rows (same for every run)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm.config import ModelConfig
    from llm.train.model import build_model

    base = root / "base"
    if not base.exists() and SHAPE:
        from bench.compress import shaped_model

        shaped_model(SHAPE).save_pretrained(str(base), safe_serialization=True)
    elif not base.exists():
        build_model(ModelConfig(**MODEL), VOCAB, seed=0).save_pretrained(str(base), safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(256, SEQ), dtype=np.int32)
    labels = ids.copy()
    labels[:, : SEQ // 2] = -100  # the prompt half is masked, as in chat SFT
    shard = root / "train.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(list(ids), pa.list_(pa.int32())),
                             "labels": pa.array(list(labels), pa.list_(pa.int32()))}), shard)
    return base, [str(shard)]


def ours(method: str, root: Path, steps: int, precision: str) -> dict[str, Any]:
    from llm.config import ModelConfig, ScheduleConfig, TrainConfig
    from llm.eval import PeakMemory
    from llm.train.loop import run_loop
    from llm.train.lora import apply
    from llm.train.runtime import LocalRuntime
    from llm.train.spec import LoopSpec

    base, files = _setup(root)
    train = TrainConfig(max_steps=steps, micro_batch_size=MICRO, zero_stage=2, precision=precision, weight_decay=0.0,
                        lr=ScheduleConfig(kind="constant", peak=1e-4, warmup_steps=0), checkpoint_every=10**6,
                        eval_every=10**6, log_every=1, max_failures=0)
    lora = method == "lora"
    spec = LoopSpec(train=train, model=ModelConfig(path=str(base)), vocab_size=VOCAB, seq_len=SEQ,
                    train_files=files, columns=["input_ids", "labels"], pad_id=0, stage="finetune", export=False,
                    model_hook=apply if lora else None, extra={"lora": LORA}, peak_flops=1e12,
                    out_dir=str(root / f"out-{method}"))
    rt = LocalRuntime(device="cpu")
    import deepspeed  # noqa: F401 - imported before the measured block: memory of training, not of imports
    import peft  # noqa: F401
    import transformers  # noqa: F401

    with PeakMemory("cpu") as peak:
        run_loop(spec, rt)
    from llm.train.metrics import read_records

    times = [r["step_time_s"] for r in read_records(root / f"out-{method}" / "metrics.jsonl")][WARMUP:]
    trainable = _trainable(base, lora)
    return {"step_s": statistics.median(times), "peak_mb": peak.bytes / 2**20, **trainable}


def _trainable(base: Path, lora: bool) -> dict[str, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    total = sum(p.numel() for p in model.parameters())
    if not lora:
        return {"trainable": total, "params": total}
    from llm.config import ModelConfig, TrainConfig
    from llm.train.lora import apply
    from llm.train.spec import LoopSpec

    wrapped = apply(model, LoopSpec(train=TrainConfig(), model=ModelConfig(), vocab_size=VOCAB, seq_len=SEQ,
                                    extra={"lora": LORA}))
    return {"trainable": sum(p.numel() for p in wrapped.parameters() if p.requires_grad), "params": total}


def plain(root: Path, steps: int, precision: str) -> dict[str, Any]:
    import time

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from llm.eval import PeakMemory
    from llm.train.data import ShardIndex, collate_padded, read_rows
    from llm.train.lora import lora_config

    base, files = _setup(root)
    rows = next(read_rows(ShardIndex.of(files), 0, steps * MICRO, ["input_ids", "labels"]))
    collate = collate_padded(0)
    batches = [collate({k: v[i * MICRO:(i + 1) * MICRO] for k, v in rows.items()}) for i in range(steps)]
    times = []
    with PeakMemory("cpu") as peak:
        loaded = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = get_peft_model(loaded, lora_config(loaded, LORA))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        for batch in batches:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[WARMUP:]), "peak_mb": peak.bytes / 2**20}


def one(kind: str, root: Path, steps: int, threads: int, precision: str) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    result = plain(root, steps, precision) if kind == "plain" else ours(kind, root, steps, precision)
    print("RESULT " + json.dumps(result), flush=True)


def run_one(kind: str, root: Path, steps: int, threads: int, precision: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--one", kind, "--root", str(root), "--steps", str(steps),
                          "--threads", str(threads), "--precision", precision,
                          *(["--shape", SHAPE] if SHAPE else [])],
                         capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{kind} run failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][7:])
    return result


def full_fits() -> tuple[bool, float, float]:
    """(whether full fine-tuning fits here, GB it needs at least, GB available): fp32 weights, gradients and
    Adam's two moments are 16 bytes a parameter before any activation; the model is counted on the meta
    device (nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.config import ModelConfig
    from llm.train.model import hf_config

    if SHAPE is None:
        return True, 0.0, 0.0
    from bench.compress import SHAPES

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(ModelConfig(**SHAPES[SHAPE]["model"]), VOCAB))
    need = sum(p.numel() for p in model.parameters()) * 16 / 2**30
    have = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable")) / 2**20
    return need < 0.8 * have, need, have


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--one", choices=["full", "lora", "plain"])
    ap.add_argument("--root")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--shape", choices=["qwen2.5-0.5b", "llama-3.2-1b"], default=None,
                    help="a published shape with random weights (bench/compress.py SHAPES), micro batch 1")
    args = ap.parse_args()
    use_shape(args.shape)
    if args.one:
        one(args.one, Path(args.root), args.steps, args.threads, args.precision)
        return
    fits, need_gb, have_gb = full_fits()
    with tempfile.TemporaryDirectory(prefix="llmray-bench-ft-") as tmp:
        root = Path(tmp)
        lora, base = (run_one(kind, root, args.steps, args.threads, args.precision) for kind in ("lora", "plain"))
        full = run_one("full", root, args.steps, args.threads, args.precision) if fits else None
    what = f"{SHAPE} shape" if SHAPE else f"llama {MODEL['n_layers']}x{MODEL['d_model']}"
    print(f"model: {what}, {lora['params'] / 1e6:.1f}M parameters, vocabulary {VOCAB:,}, "
          f"seq {SEQ}, micro {MICRO}, {args.precision}, {args.threads} threads, {args.steps} steps "
          f"(median after {WARMUP})")
    if full is None:
        print(f"full fine-tuning not run: its weights, gradients and Adam states alone need {need_gb:.1f} GB, "
              f"this machine has {have_gb:.1f} GB available; what it would cost comes from `llmray plan`")
        print(f"step s: lora {lora['step_s']:.3f}, plain peft lora {base['step_s']:.3f}; "
              f"peak MB: lora {lora['peak_mb']:.0f}, plain peft lora {base['peak_mb']:.0f}")
        print(f"step time our LoRA step / plain PyTorch + peft: {lora['step_s'] / base['step_s']:.2f} (goal <= 1.10)")
        return
    print(f"step s: full {full['step_s']:.3f}, lora {lora['step_s']:.3f}, plain peft lora {base['step_s']:.3f}; "
          f"peak MB: full {full['peak_mb']:.0f}, lora {lora['peak_mb']:.0f}, plain peft lora {base['peak_mb']:.0f}")
    print(f"trainable parameters LoRA / full: {lora['trainable']:,} / {full['trainable']:,} = "
          f"{lora['trainable'] / full['trainable']:.4f} (goal <= 0.02)")
    print(f"peak memory of a training worker, LoRA / full: {lora['peak_mb'] / full['peak_mb']:.2f} (goal <= 0.5)")
    print(f"step time LoRA / full: {lora['step_s'] / full['step_s']:.2f} (goal <= 0.9)")
    print(f"step time our LoRA step / plain PyTorch + peft: {lora['step_s'] / base['step_s']:.2f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
