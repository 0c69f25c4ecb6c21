"""The one training loop: a causal LM under `deepspeed.initialize`, driven by Ray Train or directly.

`train_loop_per_worker(config)` is what `TorchTrainer` runs; `config` is a plain dict (a `LoopSpec`),
so a Tune trial, fine-tuning or distillation can call the same function. `run_loop(spec, runtime)` is
the body; the runtime (`llm.train.runtime`) supplies rank, device and checkpoint I/O. Batches are dicts
(`input_ids`, `labels`, optionally `attention_mask`); a stage may wrap the model before DeepSpeed sees it
(`LoopSpec.model_hook`, e.g. LoRA) and replace the loss (`LoopSpec.loss_hook`, e.g. distillation).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm.config import ModelConfig, TrainConfig
from llm.errors import TrainingError
from llm.train import checkpoint as ckpt
from llm.train import ds_config
from llm.train.data import (
    COLUMN,
    RankSlice,
    ShardIndex,
    collate_packed,
    collate_padded,
    micro_batches,
    rest_layout,
)
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
    train_files: list[str] = field(default_factory=list)
    """Training parquet shards in their global order; each rank reads its own slice."""
    columns: list[str] = field(default_factory=lambda: [COLUMN])
    """Columns read: `input_ids` (packed, labels are the inputs) or `input_ids` + `labels` (padded per batch)."""
    pad_id: int | None = None
    """Set for variable-length rows: pad inputs with it (labels with -100, mask 0)."""
    tokenizer_dir: str | None = None
    out_dir: str | None = None
    """Where rank 0 writes metrics.jsonl, TensorBoard files and `model/` (the export)."""
    stage: str = "pretrain"
    export: bool = True
    peak_flops: float | None = None
    """Per-device peak FLOP/s for MFU; default: datasheet on GPU, measured matmul peak on CPU."""
    val_files: list[str] = field(default_factory=list)
    """Held-out parquet shards. Evaluation reads its few batches straight from them with pyarrow."""
    resume_from: str | None = None
    """A whole checkpoint of this run chosen by the stage (after a restart of the stage itself)."""
    init_checkpoint: str | None = None
    """A checkpoint of an earlier run to continue from on purpose (`init_from`): weights, optimizer, step."""
    data_id: str = ""
    """Identity of the training data (its manifest hash): the data position carries over only for the same."""
    model_hook: str | None = None
    """`module:function(model, spec) -> model` applied before `deepspeed.initialize` (LoRA, a teacher)."""
    loss_hook: str | None = None
    """`module:function(spec) -> loss_fn(engine, outputs, batch) -> loss`; default: the model's own loss."""
    export_hook: str | None = None
    """`module:function(engine, spec, tokenizer)` run by every rank instead of the full-model export (LoRA
    writes its adapter); default: `llm.train.export.export_model` into `<out_dir>/model`."""
    fail_at_step: int | None = None
    """Testing hook: raise once after this step (and its checkpoint) to simulate an interruption."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(path: str) -> Callable[..., Any]:
    """A `module:function` reference (hooks cross process boundaries as strings)."""
    module, _, name = path.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return fn


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config=spec.to_dict())`."""
    from llm.train.runtime import RayRuntime

    spec = LoopSpec(**config)
    run_loop(spec, RayRuntime())


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


def _sum_across_ranks(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def evaluate(engine: Any, rt: Any, spec: LoopSpec, rows: int, micro: int, batches: int,
             cache: list[Any]) -> float | None:
    """Mean validation loss over the first `batches` global batches (every rank sees the same number).

    Those few batches are read once and kept in `cache`: the held-out set must be the same at every
    evaluation, and reading it again would cost time for nothing.
    """
    import torch

    from llm.train.data import parquet_batches

    if not spec.val_files:  # a data stage with `val_fraction: 0`: no evaluation, not a crash
        return None
    if spec.pad_id is not None:
        return _evaluate_padded(engine, rt, spec, micro, batches, cache)
    if not cache:
        for i, batch in enumerate(parquet_batches(spec.val_files, rows)):
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
    if not n:
        return None
    s, count = _sum_across_ranks([total / n, 1.0], rt.device)
    return s / count


def _evaluate_padded(engine: Any, rt: Any, spec: LoopSpec, micro: int, batches: int, cache: list[Any]) -> float | None:
    """Token-weighted loss over labelled tokens (assistant tokens for SFT) of the first held-out rows.

    Every rank takes the same number of rows, so every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively in each); the figure is summed nll over summed tokens across ranks,
    so a batch with few assistant tokens weighs only as much as it holds.
    """
    import torch

    from llm.train.data import read_rows

    if not cache:
        index = ShardIndex.of(spec.val_files)
        per_rank = min(index.rows, batches * micro * rt.world_size) // rt.world_size
        rows: dict[str, list[Any]] = {c: [] for c in spec.columns}
        for block in read_rows(index, rt.rank * per_rank, (rt.rank + 1) * per_rank, spec.columns):
            for c in spec.columns:
                rows[c].extend(block[c])
        collate = collate_padded(int(spec.pad_id or 0))
        cache.extend(collate({c: v[i:i + micro] for c, v in rows.items()}) for i in range(0, per_rank, micro))
        if not cache:
            return None
    engine.eval()
    nll, count = 0.0, 0.0
    with torch.no_grad():
        for batch in cache:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            n = float((batch["labels"][:, 1:] != -100).sum())
            loss = engine(**batch).loss.float()
            if n:  # a batch without a labelled token has a NaN mean loss and no weight
                nll += float(loss) * n
                count += n
    engine.train()
    total, tokens = _sum_across_ranks([nll, count], rt.device)
    return total / tokens if tokens else None


@dataclass
class Start:
    """Where a fit starts: the checkpoint to load (if any), its saved loop state, and how DeepSpeed reads it."""

    folder: str | None = None
    saved: dict[str, Any] = field(default_factory=dict)
    on_purpose: bool = False
    """`init_checkpoint`: an earlier run continued on purpose (its own batch settings are not carried over)."""
    shared: bool = True
    """The folder is in the run's storage (chosen by the stage), not a copy Ray Train downloaded."""


def _start(reported: str | None, spec: LoopSpec) -> Start:
    """Resume (this fit's checkpoint, else the stage's choice), else continue from `init_checkpoint`, else 0."""
    if reported and ckpt.verify(reported, checksums=False) is None:
        return Start(reported, ckpt.read_state(reported), shared=False)
    if spec.resume_from:
        return Start(spec.resume_from, ckpt.read_state(spec.resume_from))
    if spec.init_checkpoint:
        return Start(spec.init_checkpoint, ckpt.read_state(spec.init_checkpoint), on_purpose=True)
    return Start()


def deepspeed_config(train: TrainConfig, world_size: int, stage: str, start: Start) -> dict[str, Any]:
    """The DeepSpeed config for this fit. Resuming a run saved by another world size keeps its global batch
    (gradient accumulation absorbs the change; `ConfigError` when it cannot) and loads the checkpoint in
    DeepSpeed's universal form when ZeRO partitioned the optimizer state."""
    cfg = ds_config.build(train, world_size, stage)
    old_world = int(start.saved.get("world_size", world_size))
    if start.folder is None or old_world == world_size:
        return cfg
    if not start.on_purpose:
        micro = int(start.saved.get("micro", cfg["train_micro_batch_size_per_gpu"]))
        accum = int(start.saved.get("accum", cfg["gradient_accumulation_steps"]))
        cfg = ds_config.keep_global_batch(cfg, micro * accum * old_world, world_size, stage, start.folder)
    if ckpt.partitioned(start.folder):
        cfg = ds_config.merge(cfg, {"checkpoint": {"load_universal": True}})
    return cfg


def _initial_state(engine: Any, rt: Any, spec: LoopSpec, start: Start, index: ShardIndex, micro: int,
                   universal: bool) -> dict[str, Any]:
    """The loop state to continue from; with another world size, the data position mapped onto this one's
    ranks (`llm.train.data.rest_layout`): no micro-batch read twice or skipped."""
    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "layout": None}
    if start.folder is None:
        return state
    source = ckpt.universal(start.folder, rt.rank, start.shared) if universal else None
    state = {"layout": None, **ckpt.load(engine, start.folder, rt.rank, source)}
    if start.on_purpose and state.get("data_id") != spec.data_id:  # new data: its first batch, steps carry on
        state.update(epoch=0, position=0, layout=None)
        return state
    old_world = int(state.get("world_size", rt.world_size))
    if old_world == rt.world_size:
        return state
    old_micro = int(state.get("micro", micro))
    if old_micro != micro:  # batches of another size cannot be dealt out again: the same share of the epoch
        old = RankSlice(index, 0, old_world, old_micro)
        share = state["position"] / max(1, old.batches_per_epoch)
        state.update(position=int(share * RankSlice(index, 0, rt.world_size, micro).batches_per_epoch), layout=None)
        return state
    saved = {**state, "accum": int(state.get("accum", 1))}
    state["epoch"], state["position"], state["layout"] = rest_layout(index.rows, saved, rt.world_size, micro)
    if rt.rank == 0:
        print(f"{spec.stage}: step {state['step']} of a {old_world}-worker run continues on {rt.world_size} "
              f"workers; the rest of epoch {saved['epoch']} is dealt out again", flush=True)
    return state


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
    if spec.model_hook:
        model = resolve(spec.model_hook)(model, spec)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    fpt = flops_per_token(model, spec.seq_len)
    torch.manual_seed(train.seed + 1000 * rt.rank)  # dropout differs per rank, reproducibly
    index = ShardIndex.of(spec.train_files)
    with rt.reported_checkpoint() as reported:
        start = _start(reported, spec)
        ds_cfg = deepspeed_config(train, rt.world_size, spec.stage, start)
        micro, accum = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
        optimizer = _optimizer(model, train, lr_at(0, train.max_steps, train.schedule()))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        universal = bool(ds_cfg.get("checkpoint", {}).get("load_universal"))
        state = _initial_state(engine, rt, spec, start, index, micro, universal)
    # What the checkpoints record: a later resume on another world size keeps this global batch.
    state.update(micro=micro, accum=accum)
    loss_fn = resolve(spec.loss_hook)(spec) if spec.loss_hook else None
    part = RankSlice(index, rt.rank, rt.world_size, micro, state["layout"])
    rest_epoch = state["epoch"]
    resumed_at = state["step"]
    peak = spec.peak_flops
    if peak is None:
        from llm.hardware import device_peak_flops

        # The CPU peak is measured on random matrices: with the RNG forked, a resumed run's dropout masks
        # still continue from the checkpoint's RNG state, as the uninterrupted run's do.
        with torch.random.fork_rng(devices=[]):
            peak = device_peak_flops(rt.device, ds_config.precision_dtype(train))
    log = MetricsLog(spec.out_dir, train.max_steps, train.log_every, resumed_at, train.tensorboard,
                     train.mlflow_uri, spec.stage) if rt.rank == 0 else None
    collate = collate_packed if spec.pad_id is None else collate_padded(spec.pad_id)
    batches = micro_batches(part, state["epoch"], state["position"], collate, spec.columns)
    record: dict[str, Any] = {}
    last_saved = resumed_at
    val_cache: list[Any] = []
    t0 = time.perf_counter()
    while state["step"] < train.max_steps:
        lr = lr_at(state["step"], train.max_steps, train.schedule())
        for group in optimizer.param_groups:  # ZeRO wraps this optimizer; its groups are the ones stepped
            group["lr"] = lr
        losses, tokens = [], 0
        step_batches = []
        for _ in range(accum):
            state["epoch"], state["position"], batch = next(batches)
            if state["epoch"] != rest_epoch:  # a layout dealt out at a world change held for its epoch only
                state["layout"] = None
            step_batches.append({k: v.to(rt.device) for k, v in batch.items()})
        per_item = _label_share(step_batches, rt, accum) if spec.pad_id is not None and not loss_fn else None
        for batch in step_batches:
            # Padded rows carry different numbers of labelled tokens: every labelled token of the step (all
            # micro batches, all ranks) weighs the same, not every micro batch's mean.
            out = engine(**batch) if per_item is None else engine(**batch, num_items_in_batch=per_item)
            loss = loss_fn(engine, out, batch) if loss_fn else out.loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            losses.append(loss.detach().float())
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        loss_sum, step_tokens = _sum_across_ranks([float(torch.stack(losses).mean()), float(tokens)], rt.device)
        loss_value = loss_sum / rt.world_size
        state["step"] += 1
        state["tokens"] += int(step_tokens)
        norm = engine.get_global_grad_norm()
        # From the previous step's end: its evaluation, checkpoint and report count in this step's time.
        now = time.perf_counter()
        dt, t0 = now - t0, now
        step = state["step"]
        record = {"step": step, "loss": loss_value, "lr": lr,
                  "grad_norm": None if norm is None else float(norm), "step_time_s": dt,
                  "tokens": state["tokens"], "tokens_per_s": step_tokens / dt,
                  "mfu": mfu(fpt, step_tokens / dt, rt.world_size, peak), "epoch": state["epoch"]}
        if step % train.eval_every == 0 or step == train.max_steps:
            val = evaluate(engine, rt, spec, micro * rt.world_size, micro, train.eval_batches, val_cache)
            if val is not None:
                record.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
        if not math.isfinite(loss_value):
            raise TrainingError(f"{spec.stage}: step {step}: loss is {loss_value}; lower "
                                f"metadata.llm.{spec.stage}.lr.peak or check the data")
        if record["grad_norm"] is not None and not math.isfinite(record["grad_norm"]) and train.precision != "fp16":
            # fp16's loss scaler skips such steps on purpose; in bf16 and fp32 they are divergence.
            raise TrainingError(f"{spec.stage}: step {step}: gradient norm is {record['grad_norm']}; lower "
                                f"metadata.llm.{spec.stage}.lr.peak or check the data")
        if log is not None:
            log.log(record)
        save = step % train.checkpoint_every == 0 or step == train.max_steps
        # Ray Train hears of checkpoints and evaluations only (rank 0 logs every step itself): a report
        # blocks until the controller's next poll (2 s) has taken the previous one, a stall per report.
        if save or "val_loss" in record:
            _report(engine, rt, record, _saved_state(state, rt, spec, part) if save else None)
            last_saved = step if save else last_saved
        if spec.fail_at_step == step and spec.out_dir and not (Path(spec.out_dir) / ".failed_once").exists():
            (Path(spec.out_dir) / ".failed_once").touch()
            raise RuntimeError(f"simulated interruption after step {step} (fail_at_step)")
    if state["step"] != last_saved:  # resumed after the last step's checkpoint: nothing left to save
        _report(engine, rt, record or {"step": state["step"]}, _saved_state(state, rt, spec, part))
    _finish(engine, rt, spec, train, state, resumed_at, tokenizer)
    if log is not None:
        log.close()
    return record


def _label_share(step_batches: list[dict[str, Any]], rt: Any, accum: int) -> Any:
    """The divisor that makes each micro batch's summed loss a share of the step's token-weighted mean.

    DeepSpeed divides each micro batch's loss by the accumulation steps and averages gradients over ranks;
    dividing each summed loss by (labelled tokens of the whole step across ranks) / (accum x world) undoes
    both, so the step's gradient is that of the mean over every labelled token (transformers' loss takes it
    as `num_items_in_batch` and counts the labels it shifts the same way)."""
    import torch

    local = sum(int((b["labels"][..., 1:] != -100).sum()) for b in step_batches)
    (total,) = _sum_across_ranks([float(local)], rt.device)
    return torch.tensor(max(total, 1.0) / (accum * rt.world_size), device=rt.device)


def _saved_state(state: dict[str, Any], rt: Any, spec: LoopSpec, part: RankSlice) -> dict[str, Any]:
    """The loop state a checkpoint records: position as an integer to resume from and as (shard, row)."""
    zero = RankSlice(part.index, 0, part.world, part.micro, state["layout"])
    return {**state, "world_size": rt.world_size, "data_id": spec.data_id, "rank0_next": zero.where(state["position"])}


def _finish(engine: Any, rt: Any, spec: LoopSpec, train: TrainConfig, state: dict[str, Any], resumed_at: int,
            tokenizer: Any) -> None:
    """Each rank's own account (node, steps, threads), then the export (every rank takes part)."""
    import torch

    if spec.out_dir:
        ranks = Path(spec.out_dir) / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank{rt.rank}.json").write_text(json.dumps(
            {"rank": rt.rank, "world_size": rt.world_size, "node": rt.node, "step": state["step"],
             "tokens": state["tokens"], "resumed_at": resumed_at, "threads": torch.get_num_threads()}))
    if spec.export and spec.out_dir:
        if spec.export_hook:
            resolve(spec.export_hook)(engine, spec, tokenizer)
            return
        from llm.train.export import export_model

        export_model(engine, Path(spec.out_dir) / "model", tokenizer)


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
