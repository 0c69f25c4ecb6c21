"""The one training loop: a causal LM under `deepspeed.initialize`, driven by Ray Train or directly.

`train_loop_per_worker(config)` is what `TorchTrainer` runs; `config` is a plain dict (a `LoopSpec`),
so a Tune trial, fine-tuning or distillation can call the same function. `run_loop(spec, runtime)` is
the body; the runtime supplies rank, device, data and checkpoint I/O: `RayRuntime` inside Ray Train,
`LocalRuntime` for one process without Ray (bench/train_gpu.py, `sizing.workers: 0`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm.config import ModelConfig, TrainConfig
from llm.train import checkpoint as ckpt
from llm.train import ds_config
from llm.train.metrics import MetricsLog, mfu
from llm.train.model import build_model, flops_per_token
from llm.train.schedules import lr_at


@dataclass
class LoopSpec:
    """Everything the loop needs, JSON-ready so it crosses process boundaries as a plain dict."""

    train: dict[str, Any]
    """`TrainConfig` fields (a stage section without its `model`)."""
    model: dict[str, Any]
    """`ModelConfig` fields."""
    vocab_size: int
    seq_len: int
    tokenizer_dir: str | None = None
    out_dir: str | None = None
    """Where rank 0 writes metrics.jsonl, TensorBoard files and `model/` (the export)."""
    stage: str = "pretrain"
    export: bool = True
    peak_flops: float | None = None
    """Per-device peak FLOP/s for MFU; default: datasheet on GPU, measured matmul peak on CPU."""
    val_files: list[str] = field(default_factory=list)
    """Held-out parquet shards. Evaluation reads its few batches straight from them with pyarrow: a Ray
    Data execution costs ~15 s of task start-up on a small machine, for `eval_batches` rows at most."""
    fail_at_step: int | None = None
    """Testing hook: raise once after this step (and its checkpoint) to simulate an interruption."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RayRuntime:
    """Inside a Ray Train worker: its rank, device, dataset shards, report and checkpoint."""

    def __init__(self, val_files: list[str] | None = None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()
        self.val_files = val_files or []

    def batches(self, split: str, rows: int) -> Iterable[Any]:
        import ray.train

        from llm.train.data import parquet_batches, stack_ids

        if split == "val":  # read directly, never through Ray Data (see `evaluate`); none: no evaluation
            return parquet_batches(self.val_files, rows) if self.val_files else iter(())
        shard = ray.train.get_dataset_shard(split)
        if shard is None:
            return iter(())
        return shard.iter_torch_batches(batch_size=rows, drop_last=True, collate_fn=stack_ids, prefetch_batches=2)

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        import ray.train

        found = ray.train.get_checkpoint()
        return found.as_directory() if found is not None else contextlib.nullcontext(None)

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalRuntime:
    """One process, no Ray: batches come from a callable, checkpoints from a folder, reports to a list."""

    def __init__(self, batches: Callable[[str, int], Iterable[Any]], checkpoint_dir: str | None = None,
                 device: Any = None) -> None:
        import torch

        self.rank, self.world_size, self.node = 0, 1, "local"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._batches, self.checkpoint_dir = batches, checkpoint_dir
        self.reports: list[dict[str, Any]] = []
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)

    def batches(self, split: str, rows: int) -> Iterable[Any]:
        return self._batches(split, rows)

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        found = self.checkpoint_dir and (Path(self.checkpoint_dir) / "loop_state.json").exists()
        return contextlib.nullcontext(self.checkpoint_dir if found else None)

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        self.reports.append(metrics)
        if folder and self.checkpoint_dir:
            shutil.copytree(folder, self.checkpoint_dir, dirs_exist_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config=spec.to_dict())`."""
    spec = LoopSpec(**config)
    run_loop(spec, RayRuntime(spec.val_files))


def _prepare_deepspeed(device: Any) -> Any:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu":
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory allreduce (`deepspeed_shm_comm`,
        # minutes on a fresh machine) whenever it reads as compatible; gloo does the same job here.
        # The probe result is cached in one dict that DeepSpeed documents as editable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not __import__("torch").distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return deepspeed


def _optimizer(model: Any, train: TrainConfig, lr: float) -> Any:
    """AdamW without weight decay on biases and norms. torch's AdamW, not DeepSpeed's fused Adam (a JIT op);
    with optimizer offload, DeepSpeedCPUAdam, which ZeRO-Offload requires."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=train.betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=train.betas)


def _micro_batches(rt: Any, rows: int, micro: int, epoch: int, skip: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, position after this batch, this rank's rows) forever, starting `skip` batches into `epoch`."""
    while True:
        seen = 0
        for i, batch in enumerate(rt.batches("train", rows)):
            if i < skip:
                continue  # already trained on before the restart
            seen += 1
            yield epoch, i + 1, batch[rt.rank * micro:(rt.rank + 1) * micro]
        if seen == 0 and skip == 0:
            raise RuntimeError(f"train split has fewer than {rows} sequences (micro_batch_size x workers)")
        epoch, skip = epoch + 1, 0


def _mean_across_ranks(value: Any, device: Any) -> float:
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


def evaluate(engine: Any, rt: Any, rows: int, micro: int, batches: int, cache: list[Any]) -> float | None:
    """Mean validation loss over the first `batches` global batches (every rank sees the same number).

    Those few batches are read once and kept in `cache`: each new Ray Data execution costs seconds of
    task scheduling on a small machine, and the held-out set must be the same at every evaluation anyway.
    """
    import torch

    if not cache:
        for i, batch in enumerate(rt.batches("val", rows)):
            if i >= batches:
                break
            cache.append(batch[rt.rank * micro:(rt.rank + 1) * micro].clone())
    engine.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in cache:
            ids = ids.to(rt.device)
            total += float(engine(input_ids=ids, labels=ids).loss.float())
            n += 1
    engine.train()
    return _mean_across_ranks(total / n, rt.device) if n else None


def run_loop(spec: LoopSpec, rt: Any) -> dict[str, Any]:
    """Train, evaluate, checkpoint, resume and export; returns the last metrics record."""
    import torch

    train = TrainConfig.model_validate(spec.train)
    deepspeed = _prepare_deepspeed(rt.device)
    tokenizer = None
    if spec.tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir)
    model = build_model(ModelConfig.model_validate(spec.model), spec.vocab_size, train.seed, tokenizer)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    fpt = flops_per_token(model, spec.seq_len)
    torch.manual_seed(train.seed + 1000 * rt.rank)  # dropout differs per rank, reproducibly
    ds_cfg = ds_config.build(train, rt.world_size, spec.stage)
    micro, accum = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    rows = micro * rt.world_size
    optimizer = _optimizer(model, train, lr_at(0, train.max_steps, train.lr))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    state = {"step": 0, "epoch": 0, "position": 0, "tokens": 0}
    with rt.latest_checkpoint() as folder:
        if folder:
            state = ckpt.load(engine, folder, rt.rank)
    resumed_at = state["step"]
    peak: float | None
    if spec.peak_flops is not None:
        peak = spec.peak_flops
    else:
        from llm.hardware import device_peak_flops

        peak = device_peak_flops(rt.device, ds_config.precision_dtype(train))
    log = MetricsLog(spec.out_dir, train.max_steps, train.log_every, resumed_at, train.tensorboard,
                     train.mlflow_uri, spec.stage) if rt.rank == 0 else None
    batches = _micro_batches(rt, rows, micro, state["epoch"], state["position"])
    tokens_per_step = rows * accum * spec.seq_len
    record: dict[str, Any] = {}
    last_saved = resumed_at
    val_cache: list[Any] = []
    while state["step"] < train.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(state["step"], train.max_steps, train.lr)
        for group in optimizer.param_groups:  # ZeRO wraps this optimizer; its groups are the ones stepped
            group["lr"] = lr
        losses = []
        for _ in range(accum):
            state["epoch"], state["position"], ids = next(batches)
            ids = ids.to(rt.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            losses.append(loss.detach().float())
        state["step"] += 1
        state["tokens"] += tokens_per_step
        loss_value = _mean_across_ranks(torch.stack(losses).mean(), rt.device)
        norm = engine.get_global_grad_norm()
        dt = time.perf_counter() - t0
        step = state["step"]
        record = {"step": step, "loss": loss_value, "lr": lr,
                  "grad_norm": None if norm is None else float(norm), "step_time_s": dt,
                  "tokens": state["tokens"], "tokens_per_s": tokens_per_step / dt,
                  "mfu": mfu(fpt, tokens_per_step / dt, rt.world_size, peak), "epoch": state["epoch"]}
        if step % train.eval_every == 0 or step == train.max_steps:
            val = evaluate(engine, rt, rows, micro, train.eval_batches, val_cache)
            if val is not None:
                record.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {step}: loss is {loss_value}; lower lr.peak or check the data")
        if log is not None:
            log.log(record)
        save = step % train.checkpoint_every == 0 or step == train.max_steps
        if save or step % train.log_every == 0 or "val_loss" in record:
            _report(engine, rt, record, dict(state) if save else None)
            last_saved = step if save else last_saved
        if spec.fail_at_step == step and spec.out_dir and not (Path(spec.out_dir) / ".failed_once").exists():
            (Path(spec.out_dir) / ".failed_once").touch()
            raise RuntimeError(f"simulated interruption after step {step} (fail_at_step)")
    if state["step"] != last_saved:  # resumed after the last step's checkpoint: nothing left to save
        _report(engine, rt, record or {"step": state["step"]}, dict(state))
    if spec.out_dir:  # each rank's own account: which node it ran on and how far it trained
        ranks = Path(spec.out_dir) / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank{rt.rank}.json").write_text(json.dumps(
            {"rank": rt.rank, "world_size": rt.world_size, "node": rt.node, "step": state["step"],
             "tokens": state["tokens"], "resumed_at": resumed_at,
             "threads": torch.get_num_threads()}))
    if spec.export and spec.out_dir:
        from llm.train.export import export_model

        export_model(engine, train.zero_stage, Path(spec.out_dir) / "model", tokenizer)
    if log is not None:
        log.close()
    return record


def _report(engine: Any, rt: Any, record: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Report metrics from every rank (Ray Train expects all ranks); with `state`, a checkpoint too."""
    metrics = {k: v for k, v in record.items() if v is not None}
    if state is None:
        rt.report(metrics, None)
        return
    folder = tempfile.mkdtemp(prefix=f"llmray-ckpt-r{rt.rank}-")
    try:
        ckpt.save(engine, folder, state, rt.rank)
        rt.report(metrics, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
