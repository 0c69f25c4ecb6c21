"""Training overhead, measured side by side in one run (not a pass/fail test).

    python bench/train.py [--windows 5] [--log-every 10] [--threads N] [--threads2 N] [--rounds 1]

Two ratios of step time, each against a plain PyTorch baseline doing the same work numerically:

1. The one loop under Ray Train + DeepSpeed (1 worker, ZeRO-2, bf16) / one plain PyTorch process.
2. The same with 2 workers / plain PyTorch DDP over gloo in 2 processes, on the same cores.

Goal for both: <= 1.10 (Ray's own release gate for Ray Train over plain torch is 1.15).

The baseline's recipe is DeepSpeed's bf16 ZeRO-2 without the partitioning: the model computes in bf16
weights; the bf16 gradients (DDP-averaged with 2 processes) are copied into an fp32 master copy, one
flat buffer per parameter group (decay / no decay, as `llm.train.loop._optimizer` builds them); the
global norm is clipped on the fp32 gradients; torch AdamW steps the fp32 master, which is copied back
into the bf16 weights. Each process reads its own share of the same parquet shards, one micro-batch per
step, on its training thread (a plain loop, no reader thread), and with 2 processes all-reduces the
loss and token count as the loop does for its metrics. Baselines run in fresh spawned processes with
the thread count of each Ray worker (`OMP_NUM_THREADS`, `torch.set_num_threads`; the workers' own count
is read back from `ranks/rank<r>.json`) and at the Ray workers' nice value (Ray starts them at 15), so
other load on a shared machine preempts both sides alike.

Our step time is the wall time between consecutive `metrics.jsonl` lines as rank 0 writes them (polled
from the driver every 2 ms): a whole loop iteration, including the Ray Train report of the step before,
which the loop's own `step_time_s` leaves out (printed beside it). The loop reports every `log_every`
steps (the shipped default, 10), so the statistic on both sides is the median over windows of
`log_every` steps of each window's mean: every window holds one report. The only checkpoint is the one
at the last step, after its line is written, so no measured step holds a checkpoint on either side.
Each baseline runs before and after its Ray run and the two are averaged, so drift on a shared machine
hits both sides alike; `--rounds` repeats the whole and takes medians. MFU is against the measured bf16
matmul peak of the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm.config import ModelConfig, ScheduleConfig, TrainConfig

VOCAB, SEQ, MICRO = 4096, 128, 8
MODEL = ModelConfig(arch="llama", n_layers=4, d_model=128, n_heads=4, context=SEQ)
WARMUP, SHARDS = 3, 4
LOG_EVERY = TrainConfig().log_every  # the shipped default: a Ray Train report every this many steps


def train_config(steps: int, log_every: int = LOG_EVERY) -> TrainConfig:
    return TrainConfig(max_steps=steps, micro_batch_size=MICRO, zero_stage=2, precision="bf16",
                       lr=ScheduleConfig(kind="constant", peak=1e-3, warmup_steps=0), checkpoint_every=10**6,
                       eval_every=10**6, log_every=log_every, max_failures=0)


def step_time(times: list[float], window: int) -> float:
    """Median over windows of `window` consecutive steps after warm-up of each window's mean step time.

    A window holds exactly one report whatever its alignment, so a report's cost is spread over the steps
    it serves instead of being dropped as an outlier, and a stall of the shared machine still is.
    """
    times = times[WARMUP:]
    means = [statistics.fmean(times[i:i + window]) for i in range(0, len(times) - window + 1, window)]
    return statistics.median(means)


def make_shards(folder: Path, steps: int) -> list[str]:
    """Enough rows for 2 workers x `steps` micro-batches, every shard a whole number of micro-batches."""
    from llm.train.data import synthetic_rows, write_rows

    per_shard = MICRO * -(-2 * steps // SHARDS)
    return write_rows(synthetic_rows(VOCAB, SEQ, per_shard * SHARDS), folder, shards=SHARDS)


# ---------------------------------------------------------------- plain PyTorch (1 process or DDP)

class MasterAdamW:
    """bf16 weights with an fp32 master copy: what DeepSpeed's bf16 ZeRO-2 optimizer does on one partition.

    The bf16 parameters of each group are views into one flat bf16 buffer (as DeepSpeed flattens them),
    so copying the updated fp32 master back is one `copy_` per group.
    """

    def __init__(self, model: Any, train: TrainConfig) -> None:
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        groups = [[p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]]
        self.groups: list[tuple[list[Any], Any, Any]] = []
        for group in groups:
            flat16 = torch.cat([p.detach().reshape(-1) for p in group])
            offset = 0
            for p in group:
                p.data = flat16[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            master = flat16.float()
            master.grad = torch.zeros_like(master)
            self.groups.append((group, flat16, master))
        self.clip = train.grad_clip
        self.opt = torch.optim.AdamW([{"params": [self.groups[0][2]], "weight_decay": train.weight_decay},
                                      {"params": [self.groups[1][2]], "weight_decay": 0.0}],
                                     lr=1e-3, betas=train.betas)

    def step(self) -> float:
        """Copy the bf16 gradients into fp32, clip, AdamW the master, copy it back; returns the grad norm."""
        import torch

        for group, _, master in self.groups:
            offset = 0
            for p in group:
                master.grad[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
                offset += p.numel()
                p.grad = None
        norm = torch.nn.utils.clip_grad_norm_([m for _, _, m in self.groups], self.clip)
        self.opt.step()
        for _, flat16, master in self.groups:
            flat16.copy_(master)
        return float(norm)


def parquet_micro_batches(files: list[str]) -> Iterator[Any]:
    """Micro-batches of packed rows read straight from `files`, one record batch per step, forever."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    while True:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=MICRO, columns=["input_ids"]):
                ids = batch.column(0).flatten().to_numpy().reshape(-1, SEQ).astype(np.int64)
                yield torch.from_numpy(ids)


def plain_worker(rank: int, world: int, steps: int, threads: int, files: list[str], port: int, out: str,
                 nice: int) -> None:
    """One baseline process (`torch.multiprocessing.spawn` target); writes its step times to `out`.<rank>."""
    import torch
    import torch.distributed as dist

    from llm.train.model import build_model

    os.nice(nice - os.nice(0))
    torch.set_num_threads(threads)
    train = train_config(steps)
    torch.manual_seed(train.seed + 1000 * rank)
    model = build_model(MODEL, VOCAB, seed=train.seed).to(torch.bfloat16)
    model.train()
    net = model
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = MasterAdamW(model, train)
    share = len(files) // world
    batches = parquet_micro_batches(files[rank * share:(rank + 1) * share])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ids = next(batches)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        totals = torch.tensor([float(loss.detach().float()), float(ids.numel())], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        totals.tolist()
        times.append(time.perf_counter() - t0)
    Path(f"{out}.{rank}").write_text(json.dumps({"times": times, "threads": torch.get_num_threads()}))
    if world > 1:
        dist.barrier()
        # Tearing down DDP's reducer and the gloo group at exit can deadlock on the GIL (torch 2.x): the
        # results are written and the peers are past the barrier, so leave without running finalizers.
        os._exit(0)


def plain_run(world: int, steps: int, threads: int, files: list[str], tmp: Path, nice: int) -> list[float]:
    """Step times of rank 0 of `world` fresh baseline processes."""
    import torch.multiprocessing as mp

    from llm.train.runtime import free_port

    os.environ["OMP_NUM_THREADS"] = str(threads)  # the spawned processes start with it, as Ray workers do
    out = tempfile.mktemp(prefix="plain-", dir=tmp)
    mp.spawn(plain_worker, args=(world, steps, threads, files, free_port(), out, nice), nprocs=world, join=True)
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    assert all(r["threads"] == threads for r in results), results
    return list(results[0]["times"])


# ---------------------------------------------------------------- ours: the one loop on Ray Train

def niceness() -> int:
    """This process's nice value: Ray starts its workers at `RAY_worker_niceness` (15 by default)."""
    return os.nice(0)


def watch_lines(path: Path, stop: threading.Event, stamps: list[float]) -> None:
    """Append the arrival time of each new line of `path` until `stop` (a 2 ms poll)."""
    seen, size = 0, -1
    while not stop.is_set():
        try:
            st = os.stat(path).st_size
        except FileNotFoundError:
            st = -1
        if st != size and st > 0:
            size = st
            now = time.perf_counter()
            n = path.read_bytes().count(b"\n")
            stamps.extend([now] * (n - seen))
            seen = max(seen, n)
        time.sleep(0.002)


def ray_run(workers: int, steps: int, threads: int, files: list[str], tmp: Path, log_every: int) -> dict[str, Any]:
    """The one loop (llm.train.loop) under Ray Train's TorchTrainer, `workers` workers of `threads` CPUs."""
    from llm.train.fit import build_trainer
    from llm.train.spec import LoopSpec

    run = Path(tempfile.mkdtemp(prefix=f"ray{workers}-", dir=tmp))
    spec = LoopSpec(train=train_config(steps, log_every), model=MODEL, vocab_size=VOCAB, seq_len=SEQ,
                    train_files=files, out_dir=str(run / "out"), export=False, peak_flops=1.0)
    stamps: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_lines, args=(run / "out" / "metrics.jsonl", stop, stamps), daemon=True)
    watcher.start()
    try:
        build_trainer(spec, {"num_workers": workers, "resources_per_worker": {"CPU": threads}}, str(run / "ray"),
                      keep_checkpoints=1, max_failures=0).fit()
    finally:
        stop.set()
        watcher.join()
    records = [json.loads(x) for x in (run / "out" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    # The first line's interval would start before the loop: step 1 is warm-up anyway, count it as 0.
    walls = [0.0] + [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    ranks = [json.loads((run / "out" / "ranks" / f"rank{r}.json").read_text()) for r in range(workers)]
    assert len(stamps) == len(records) == steps, (len(stamps), len(records), steps)
    return {"wall": walls, "step_time_s": [r["step_time_s"] for r in records], "threads": [r["threads"] for r in ranks]}


def compare(label: str, base_label: str, workers: int, args: Any, threads: int, files: list[str],
            tmp: Path, nice: int) -> tuple[float, float]:
    """Baseline, ours, baseline again; prints the three and returns (ours, baseline) in s/step."""
    steps = WARMUP + args.windows * args.log_every
    before = step_time(plain_run(workers, steps, threads, files, tmp, nice), args.log_every)
    print(f"  {base_label} (before): {before:.4f} s/step", flush=True)
    ours = ray_run(workers, steps, threads, files, tmp, args.log_every)
    assert ours["threads"] == [threads] * workers, f"worker threads {ours['threads']}, baseline {threads}"
    wall = step_time(ours["wall"], args.log_every)
    print(f"  {label}: {wall:.4f} s/step (its own step_time_s, which leaves the report out: "
          f"{step_time(ours['step_time_s'], args.log_every):.4f}; worker threads {ours['threads']})", flush=True)
    after = step_time(plain_run(workers, steps, threads, files, tmp, nice), args.log_every)
    print(f"  {base_label} (after): {after:.4f} s/step", flush=True)
    return wall, (before + after) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=5, help="measured windows of --log-every steps, after warm-up")
    ap.add_argument("--log-every", type=int, default=LOG_EVERY, help="steps between the loop's Ray Train reports")
    cores = os.cpu_count() or 2
    # Default: every core but one, which Ray's own processes (raylet, GCS, the Train controller) need on
    # any node; a worker whose threads hold every core stalls on their slices of CPU.
    ap.add_argument("--threads", type=int, default=max(1, cores - 1), help="threads of the 1-worker comparison")
    ap.add_argument("--threads2", type=int, default=max(1, (cores - 1) // 2),
                    help="threads of each of the 2 workers / DDP processes")
    ap.add_argument("--rounds", type=int, default=1, help="repeat both comparisons; ratios of the medians")
    args = ap.parse_args()

    import ray
    import torch

    from llm.hardware import cpu_peak_flops
    from llm.train.metrics import mfu
    from llm.train.model import build_model, flops_per_token

    fpt = flops_per_token(build_model(MODEL, VOCAB, seed=0), SEQ)
    tokens = MICRO * SEQ
    print(f"model: llama {MODEL.n_layers} layers x {MODEL.d_model}, vocab {VOCAB}, seq {SEQ}, micro {MICRO}, "
          f"bf16; {fpt * tokens / 1e9:.2f} GFLOP per micro-batch; {os.cpu_count()} cores; 1 worker: "
          f"{args.threads} thread(s), 2 workers: {args.threads2} thread(s) each; {WARMUP} warm-up steps + "
          f"{args.windows} x {args.log_every}, a report every {args.log_every}", flush=True)
    one: list[tuple[float, float]] = []
    two: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="llmray-bench-train-") as name:
        tmp = Path(name)
        files = make_shards(tmp / "shards", WARMUP + args.windows * args.log_every)
        ray.init(num_cpus=max(cores, 2 * args.threads2, args.threads), include_dashboard=False,
                 log_to_driver=False)
        # Ray workers run niced; the baselines get the same priority, or other load on a shared machine
        # would preempt only our side.
        nice = ray.get(ray.remote(num_cpus=0)(niceness).remote())
        print(f"Ray worker niceness {nice}: the baseline processes run at the same", flush=True)
        try:
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}: 1 worker", flush=True)
                one.append(compare("Ray Train + DeepSpeed (1 worker)", "plain PyTorch", 1, args,
                                   args.threads, files, tmp, nice))
                print(f"round {r + 1}/{args.rounds}: 2 workers", flush=True)
                two.append(compare("Ray Train + DeepSpeed (2 workers)", "plain PyTorch DDP gloo", 2, args,
                                   args.threads2, files, tmp, nice))
        finally:
            ray.shutdown()
    ours1, plain1 = (statistics.median(x[i] for x in one) for i in (0, 1))
    ours2, plain2 = (statistics.median(x[i] for x in two) for i in (0, 1))
    print(f"step time  Ray Train + DeepSpeed ZeRO-2 bf16 (1 worker) / plain PyTorch: {ours1 / plain1:.3f}  "
          f"(goal <= 1.10)")
    print(f"step time  Ray Train + DeepSpeed ZeRO-2 bf16 (2 workers) / plain PyTorch DDP gloo (2 processes): "
          f"{ours2 / plain2:.3f}  (goal <= 1.10)")
    torch.set_num_threads(args.threads)
    peak1 = cpu_peak_flops("bfloat16")
    torch.set_num_threads(args.threads2)
    peak2 = cpu_peak_flops("bfloat16")
    for what, n, peak, ours, plain in (("1 worker", 1, peak1, ours1, plain1), ("2 workers", 2, peak2, ours2, plain2)):
        print(f"MFU ({what}, bf16 matmul peak {peak / 1e9:.0f} GFLOP/s each)  ours "
              f"{100 * mfu(fpt, n * tokens / ours, n, peak):.1f}%  "
              f"plain {100 * mfu(fpt, n * tokens / plain, n, peak):.1f}%")


if __name__ == "__main__":
    main()
