"""GPU throughput of the one loop: GPT-2 124M, sequence 1024, bf16, on one GPU (goal: MFU >= 50%).

    python bench/train_gpu.py [--steps 30] [--micro 16] [--zero 2] [--compile]
    python bench/train_gpu.py --tiny        # a CPU smoke run of the same path

Runs where Ray is not installed: the same loop body (`llm.train.loop.run_loop`) and the same generated
DeepSpeed config, driven directly by `LocalRuntime` with synthetic token batches instead of Ray Train
and Ray Data. MFU is 6N plus the attention term per token over the GPU's datasheet dense bf16 peak
(`llm.hardware`); nanoGPT reports ~30% on an A100 and llm.c ~40% on an H100 for this model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm.config import ModelConfig, ScheduleConfig, TrainConfig

WARMUP = 5


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=16, help="sequences per micro batch")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile the model")
    ap.add_argument("--tiny", action="store_true", help="2 layers x 64, sequence 64: a smoke run on CPU")
    args = ap.parse_args(argv)

    import torch

    from llm.train.data import synthetic_rows, write_rows
    from llm.train.loop import run_loop
    from llm.train.runtime import LocalRuntime
    from llm.train.spec import LoopSpec

    if args.tiny:
        model, vocab, seq = ModelConfig(arch="gpt2", n_layers=2, d_model=64, n_heads=4, context=64), 512, 64
    else:  # GPT-2 small, vocabulary padded to a multiple of 64 as nanoGPT does
        model, vocab, seq = ModelConfig(arch="gpt2", n_layers=12, d_model=768, n_heads=12, context=1024), 50304, 1024
    steps = max(args.steps, WARMUP + 2)
    train = TrainConfig(max_steps=steps, micro_batch_size=args.micro, grad_accum=args.accum, zero_stage=args.zero,
                        precision=args.precision, compile=args.compile,
                        lr=ScheduleConfig(kind="cosine", peak=6e-4, warmup_steps=2),
                        checkpoint_every=10**6, eval_every=10**6, log_every=max(1, steps // 10), max_failures=0)
    rows_needed = (steps * args.accum + 1) * args.micro
    with tempfile.TemporaryDirectory(prefix="llmray-bench-gpu-") as tmp:
        files = write_rows(synthetic_rows(vocab, seq, rows_needed), Path(tmp) / "shards")
        spec = LoopSpec(train=train, model=model, vocab_size=vocab,
                        seq_len=seq, train_files=files, out_dir=tmp, export=False)
        run_loop(spec, LocalRuntime())
        records = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = records[WARMUP:]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"step_time_s": statistics.median(r["step_time_s"] for r in timed),
              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
              "mfu": statistics.median(r["mfu"] for r in timed), "first_loss": records[0]["loss"],
              "last_loss": records[-1]["loss"]}
    print(f"device: {device}; {'tiny' if args.tiny else 'GPT-2 124M'}, seq {seq}, micro {args.micro} x accum "
          f"{args.accum}, ZeRO-{args.zero} {args.precision}{', compiled' if args.compile else ''}, "
          f"{len(timed)} timed steps")
    print(f"step {result['step_time_s'] * 1e3:.1f} ms  tokens/s {result['tokens_per_s']:,.0f}  "
          f"MFU {100 * result['mfu']:.1f}%  (goal >= 50%)  "
          f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}")
    return result


if __name__ == "__main__":
    main()
