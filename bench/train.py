"""Training overhead, measured side by side in one run (not a pass/fail test).

    python bench/train.py [--steps 15] [--threads N]

Step time of the one loop under Ray Train + DeepSpeed (1 worker, ZeRO-2, bf16, reading packed parquet
shards through Ray Data) / a plain PyTorch loop on the same model, batch, threads and precision (bf16
autocast, torch AdamW, gradient clipping, batches already in memory): goal <= 1.10 (Ray's own release
gate for Ray Train over plain torch is 1.15). MFU for both, against the measured bf16 matmul peak of
the same number of threads. Step times are medians after warm-up; the plain loop runs before and after
the Ray run and its two medians are averaged, so drift on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from llm.config import ModelConfig, ScheduleConfig, TrainConfig  # noqa: E402
from llm.hardware import cpu_peak_flops  # noqa: E402
from llm.train.metrics import mfu  # noqa: E402
from llm.train.model import build_model, flops_per_token  # noqa: E402

VOCAB, SEQ, MICRO = 4096, 128, 8  # ~8 GFLOP a step: a few seconds in bf16 on a 2-core CPU
MODEL = ModelConfig(arch="llama", n_layers=4, d_model=128, n_heads=4, context=SEQ)
WARMUP = 3


def train_config(steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, micro_batch_size=MICRO, zero_stage=2, precision="bf16",
                       lr=ScheduleConfig(kind="constant", peak=1e-3, warmup_steps=0), checkpoint_every=10**6,
                       eval_every=10**6, log_every=10**6, max_failures=0)


def synthetic_rows(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=(n, SEQ), dtype=np.int32)


def plain_loop(steps: int, threads: int) -> list[float]:
    """The baseline: what a PyTorch user writes for bf16 training on one process."""
    import torch

    torch.set_num_threads(threads)
    train = train_config(steps)
    model = build_model(MODEL, VOCAB, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=train.betas, weight_decay=train.weight_decay)
    rows = torch.from_numpy(synthetic_rows(steps * MICRO).astype(np.int64))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        ids = rows[step * MICRO:(step + 1) * MICRO]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.perf_counter() - t0)
    return times[WARMUP:]


def ray_loop(steps: int, threads: int, tmp: Path) -> tuple[list[float], int]:
    """The one loop (llm.train.loop) under Ray Train's TorchTrainer, 1 worker holding `threads` CPUs."""
    import ray
    import ray.data

    from llm.train.loop import LoopSpec
    from llm.train.stage import build_trainer

    shards = tmp / "shards"
    shards.mkdir()
    rows = synthetic_rows((steps + 2) * MICRO)
    for i, part in enumerate(np.array_split(rows, 4)):
        pq.write_table(pa.table({"input_ids": pa.array(list(part), type=pa.list_(pa.int32()))}),
                       shards / f"part-{i:05d}.parquet")
    spec = LoopSpec(train=train_config(steps).model_dump(mode="json"), model=MODEL.model_dump(mode="json"),
                    vocab_size=VOCAB, seq_len=SEQ, out_dir=str(tmp / "run"), export=False, peak_flops=1.0)
    # Room for Ray Data's read tasks beside the worker, as cluster/local.yaml sizes it.
    ray.init(num_cpus=threads + 2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_parquet(sorted(str(p) for p in shards.glob("*.parquet")), shuffle=None)
        trainer = build_trainer(spec, {"num_workers": 1, "resources_per_worker": {"CPU": threads}}, tmp / "run",
                                ds, keep_checkpoints=1, max_failures=0)
        trainer.fit()
    finally:
        ray.shutdown()
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    worker_threads = json.loads((tmp / "run" / "ranks" / "rank0.json").read_text())["threads"]
    return [r["step_time_s"] for r in records][WARMUP:], worker_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    # Default: every core but one, which Ray's own processes (raylet, GCS, the Train controller, Data's
    # executor) need on any node; a worker whose threads hold every core stalls on their slices of CPU.
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="compute threads of both loops (default: cores - 1)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    fpt = flops_per_token(build_model(MODEL, VOCAB, seed=0), SEQ)
    peak = cpu_peak_flops("bfloat16")
    tokens = MICRO * SEQ
    print(f"model: llama {MODEL.n_layers} layers x {MODEL.d_model}, vocab {VOCAB}, seq {SEQ}, micro {MICRO}, "
          f"bf16; {fpt * tokens / 1e9:.1f} GFLOP per step; {args.threads} thread(s) of {os.cpu_count()} cores; "
          f"peak (measured bf16 matmul): {peak / 1e9:.0f} GFLOP/s", flush=True)
    before = statistics.median(plain_loop(args.steps, args.threads))
    print(f"plain PyTorch (before): {before:.3f} s/step", flush=True)
    with tempfile.TemporaryDirectory(prefix="llmray-bench-train-") as tmp:
        ours_times, worker_threads = ray_loop(args.steps, args.threads, Path(tmp))
    ours = statistics.median(ours_times)
    print(f"Ray Train + DeepSpeed: {ours:.3f} s/step (worker threads: {worker_threads})", flush=True)
    after = statistics.median(plain_loop(args.steps, args.threads))
    print(f"plain PyTorch (after): {after:.3f} s/step", flush=True)
    plain = (before + after) / 2
    print(f"step time  Ray Train + DeepSpeed ZeRO-2 bf16 (1 worker) / plain PyTorch: {ours / plain:.3f}  "
          f"(goal <= 1.10)")
    ours_mfu, plain_mfu = mfu(fpt, tokens / ours, 1, peak), mfu(fpt, tokens / plain, 1, peak)
    print(f"MFU  ours {100 * ours_mfu:.1f}%  plain {100 * plain_mfu:.1f}%")


if __name__ == "__main__":
    main()
