"""The one training loop: a causal LM under `deepspeed.initialize`, driven by Ray Train or directly.

`run_loop(spec, runtime)` reads like the step it runs: `setup` (model, DeepSpeed, resume point, data),
then per step `train_step`, `evaluate_due`, `check_finite`, `checkpoint_due`, and `finish` (each rank's
account and the export). The runtime (`llm.train.runtime`) supplies rank, device and checkpoint I/O; Ray
Train's entry point is `llm.train.worker.train_loop_per_worker`. Batches are dicts (`input_ids`, `labels`,
optionally `attention_mask`); a stage may wrap the model before DeepSpeed sees it (`LoopSpec.model_hook`,
e.g. LoRA) and replace the loss (`LoopSpec.loss_hook`, e.g. distillation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.config import TrainConfig
from llm.errors import TrainingError
from llm.hardware import device_peak_flops
from llm.train import checkpoint as ckpt
from llm.train import ds_config
from llm.train.data import RankSlice, ShardIndex, collate_packed, collate_padded, micro_batches, rest_layout
from llm.train.evaluate import evaluate, sum_across_ranks
from llm.train.export import export_model
from llm.train.metrics import MetricsLog, mfu
from llm.train.model import build_model, flops_per_token
from llm.train.runtime import Runtime
from llm.train.schedules import lr_at
from llm.train.spec import LoopSpec
from llm.train.state import LoopState


@dataclass
class Start:
    """Where a fit starts: the checkpoint to load (if any), its saved loop state, and how DeepSpeed reads it."""

    folder: str | None = None
    saved: LoopState = field(default_factory=LoopState)
    on_purpose: bool = False
    """`init_checkpoint`: an earlier run continued on purpose (its own batch settings are not carried over; at
    another world size it is converted into this stage's folder, never into its source)."""


@dataclass
class Fit:
    """One fit's live parts, made by `setup` and advanced by the step functions."""

    spec: LoopSpec
    rt: Runtime
    engine: Any
    optimizer: Any
    state: LoopState
    part: RankSlice
    batches: Iterator[tuple[int, int, Any]]
    fpt: float
    """Training FLOPs per token, for MFU."""
    peak: float | None
    log: MetricsLog | None
    """Rank 0's metrics sinks (None on other ranks)."""
    loss_fn: Callable[..., Any] | None
    tokenizer: Any
    resumed_at: int
    rest_epoch: int
    """The epoch a world-size change's layout holds for."""
    last_saved: int
    t0: float = field(default_factory=time.perf_counter)
    val_cache: list[Any] = field(default_factory=list)

    @property
    def train(self) -> TrainConfig:
        return self.spec.train


def run_loop(spec: LoopSpec, rt: Runtime) -> dict[str, Any]:
    """Train, evaluate, checkpoint, resume and export; returns the last metrics record."""
    fit = setup(spec, rt)
    record: dict[str, Any] = {}
    while fit.state.step < spec.train.max_steps:
        record = train_step(fit)
        evaluate_due(fit, record)
        check_finite(spec, record)
        if fit.log is not None:
            fit.log.log(record)
        checkpoint_due(fit, record)
        _fail_once(spec, fit.state.step, fit.rt)
    if fit.state.step != fit.last_saved:  # resumed after the last step's checkpoint: nothing left to save
        _report(fit, record or {"step": fit.state.step}, save=True)
    finish(fit)
    if fit.log is not None:
        fit.log.close()
    return record


def setup(spec: LoopSpec, rt: Runtime) -> Fit:
    """The model (with its hook), DeepSpeed's engine, the state to continue from and this rank's batches.

    The order is that of every earlier run: the RNG draws (init, dropout seeds) stay where goldens expect them.
    """
    import torch

    train = spec.train
    deepspeed = _prepare_deepspeed(rt.device)
    tokenizer = _tokenizer(spec)
    model = build_model(spec.model, spec.vocab_size, train.seed, tokenizer)
    if spec.model_hook:
        model = spec.model_hook(model, spec)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    fpt = flops_per_token(model, spec.seq_len)
    if train.compile:
        model.compile()  # in place: the state dict keeps its keys, so checkpoints and the export do not change
    torch.manual_seed(train.seed + 1000 * rt.rank)  # dropout differs per rank, reproducibly
    index = ShardIndex.of(spec.train_files)
    with rt.reported_checkpoint() as reported:
        start = _start(reported, spec)
        ds_cfg = deepspeed_config(train, rt.world_size, spec.stage, start)
        micro = ds_cfg["train_micro_batch_size_per_gpu"]
        optimizer = _optimizer(model, train, lr_at(0, train.max_steps, train.schedule()), rt.device)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        state = _loaded_state(engine, rt, spec, start, bool(ds_cfg.get("checkpoint", {}).get("load_universal")))
    state = _continued(state, rt, spec, start, index, micro)
    # What the checkpoints record: a later resume on another world size keeps this global batch.
    state.micro, state.accum = micro, ds_cfg["gradient_accumulation_steps"]
    loss_fn = spec.loss_hook(spec) if spec.loss_hook else None
    part = RankSlice(index, rt.rank, rt.world_size, micro, state.layout)
    sinks = spec.tracking  # the pipeline's `tracking` section wins over the stage section's own keys
    log = MetricsLog(spec.out_dir, train.max_steps, train.log_every, state.step,
                     train.tensorboard or bool(sinks.get("tensorboard")), sinks.get("mlflow_uri") or train.mlflow_uri,
                     spec.stage, mlflow_run_id=sinks.get("mlflow_run_id")) if rt.rank == 0 else None
    collate = collate_packed if spec.pad_id is None else collate_padded(spec.pad_id)
    return Fit(spec=spec, rt=rt, engine=engine, optimizer=optimizer, state=state, part=part,
               batches=micro_batches(part, state.epoch, state.position, collate, spec.columns), fpt=fpt,
               peak=_peak(spec, rt), log=log, loss_fn=loss_fn, tokenizer=tokenizer, resumed_at=state.step,
               rest_epoch=state.epoch, last_saved=state.step)


def train_step(fit: Fit) -> dict[str, Any]:
    """One optimizer step: `accum` micro batches on every rank; returns the step's record."""
    import torch

    spec, rt, state, engine = fit.spec, fit.rt, fit.state, fit.engine
    lr = lr_at(state.step, fit.train.max_steps, fit.train.schedule())
    for group in fit.optimizer.param_groups:  # ZeRO wraps this optimizer; its groups are the ones stepped
        group["lr"] = lr
    step_batches = _next_batches(fit)
    per_item = _label_share(step_batches, rt) if spec.pad_id is not None and not fit.loss_fn else None
    losses, tokens = [], 0
    for batch in step_batches:
        # Padded rows carry different numbers of labelled tokens: every labelled token of the step (all
        # micro batches, all ranks) weighs the same, not every micro batch's mean.
        out = engine(**batch) if per_item is None else engine(**batch, num_items_in_batch=per_item)
        loss = fit.loss_fn(engine, out, batch) if fit.loss_fn else out.loss
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        losses.append(loss.detach().float())
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    loss_sum, step_tokens = sum_across_ranks([float(torch.stack(losses).mean()), float(tokens)], rt.device)
    state.step += 1
    state.tokens += int(step_tokens)
    norm = engine.get_global_grad_norm()
    # From the previous step's end: its evaluation, checkpoint and report count in this step's time.
    now = time.perf_counter()
    dt, fit.t0 = now - fit.t0, now
    return {"step": state.step, "loss": loss_sum / rt.world_size, "lr": lr,
            "grad_norm": None if norm is None else float(norm), "step_time_s": dt, "tokens": state.tokens,
            "tokens_per_s": step_tokens / dt, "mfu": mfu(fit.fpt, step_tokens / dt, rt.world_size, fit.peak),
            "epoch": state.epoch}


def _next_batches(fit: Fit) -> list[dict[str, Any]]:
    """The step's `accum` micro batches of this rank, on its device; the data position moves with them."""
    state, out = fit.state, []
    for _ in range(fit.state.accum or 1):
        state.epoch, state.position, batch = next(fit.batches)
        if state.epoch != fit.rest_epoch:  # a layout dealt out at a world change held for its epoch only
            state.layout = None
        out.append({k: v.to(fit.rt.device) for k, v in batch.items()})
    return out


def evaluate_due(fit: Fit, record: dict[str, Any]) -> None:
    """Every `eval_every` steps and at the last: the validation loss and perplexity into `record`."""
    step, train = fit.state.step, fit.train
    if step % train.eval_every == 0 or step == train.max_steps:
        val = evaluate(fit.engine, fit.rt, fit.spec, fit.part.micro, fit.val_cache)
        if val is not None:
            record.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))


def check_finite(spec: LoopSpec, record: dict[str, Any]) -> None:
    """A non-finite loss (or, outside fp16, gradient norm) stops the run with one line naming the key."""
    step, loss, norm = record["step"], record["loss"], record["grad_norm"]
    if not math.isfinite(loss):
        raise TrainingError(f"{spec.stage}: step {step}: loss is {loss}; lower "
                            f"metadata.llm.{spec.stage}.lr.peak or check the data")
    if norm is not None and not math.isfinite(norm) and spec.train.precision != "fp16":
        # fp16's loss scaler skips such steps on purpose; in bf16 and fp32 they are divergence.
        raise TrainingError(f"{spec.stage}: step {step}: gradient norm is {norm}; lower "
                            f"metadata.llm.{spec.stage}.lr.peak or check the data")


def checkpoint_due(fit: Fit, record: dict[str, Any]) -> None:
    """Every `checkpoint_every` steps and at the last: a checkpoint. Ray Train hears of checkpoints and
    evaluations only (rank 0 logs every step itself): a report blocks until the controller's next poll (2 s)
    has taken the previous one, a stall per report."""
    step, train = fit.state.step, fit.train
    save = step % train.checkpoint_every == 0 or step == train.max_steps
    if save or "val_loss" in record:
        _report(fit, record, save)
        fit.last_saved = step if save else fit.last_saved


def _fail_once(spec: LoopSpec, step: int, rt: Runtime) -> None:
    """`kill_at_step`: the last rank SIGKILLs itself once; `fail_at_step`: raise once (a marker file in
    `out_dir` remembers either) to simulate an interruption."""
    if (spec.kill_at_step == step and rt.rank == rt.world_size - 1 and spec.out_dir
            and not (Path(spec.out_dir) / ".killed_once").exists()):
        (Path(spec.out_dir) / ".killed_once").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.fail_at_step == step and spec.out_dir and not (Path(spec.out_dir) / ".failed_once").exists():
        (Path(spec.out_dir) / ".failed_once").touch()
        raise RuntimeError(f"simulated interruption after step {step} (fail_at_step)")


def finish(fit: Fit) -> None:
    """Each rank's own account (node, steps, threads), then the export (every rank takes part)."""
    import torch

    spec, rt, state = fit.spec, fit.rt, fit.state
    if spec.out_dir:
        ranks = Path(spec.out_dir) / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank{rt.rank}.json").write_text(json.dumps(
            {"rank": rt.rank, "world_size": rt.world_size, "node": rt.node, "step": state.step,
             "tokens": state.tokens, "resumed_at": fit.resumed_at, "threads": torch.get_num_threads()}))
    if spec.export and spec.out_dir:
        if spec.export_hook:
            spec.export_hook(fit.engine, spec, fit.tokenizer)
        else:
            export_model(fit.engine, Path(spec.out_dir) / "model", fit.tokenizer)


def _report(fit: Fit, record: dict[str, Any], save: bool) -> None:
    """Report metrics from every rank (Ray Train expects all ranks); with `save`, a checkpoint too."""
    rt = fit.rt
    metrics = {k: v for k, v in record.items() if v is not None}
    if not save:
        rt.report(metrics, None)
        return
    with rt.checkpoint_folder(fit.state.step) as folder:  # on the stage's volume, not a copy through /tmp
        ckpt.save(fit.engine, folder, _saved_state(fit), rt.rank)
        rt.report(metrics, folder)


def _saved_state(fit: Fit) -> LoopState:
    """The loop state a checkpoint records: position as an integer to resume from and as (shard, row)."""
    state, part = fit.state, fit.part
    zero = RankSlice(part.index, 0, part.world, part.micro, state.layout)
    return LoopState(step=state.step, epoch=state.epoch, position=state.position, tokens=state.tokens,
                     layout=state.layout, micro=state.micro, accum=state.accum, world_size=fit.rt.world_size,
                     data_id=fit.spec.data_id, rank0_next=zero.where(state.position))


def _tokenizer(spec: LoopSpec) -> Any:
    if not spec.tokenizer_dir:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.tokenizer_dir)


def _peak(spec: LoopSpec, rt: Runtime) -> float | None:
    """Per-device peak FLOP/s for MFU (the spec's, else the datasheet's or a measured one)."""
    import torch

    if spec.peak_flops is not None:
        return spec.peak_flops
    # The CPU peak is measured on random matrices: with the RNG forked, a resumed run's dropout masks
    # still continue from the checkpoint's RNG state, as the uninterrupted run's do.
    with torch.random.fork_rng(devices=[]):
        return device_peak_flops(rt.device, ds_config.precision_dtype(spec.train))


def _prepare_deepspeed(device: Any) -> Any:
    import torch

    deepspeed = ds_config.import_deepspeed()

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu":
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory allreduce (`deepspeed_shm_comm`,
        # minutes on a fresh machine) whenever it reads as compatible; gloo does the same job here.
        # The probe result is cached in one dict that DeepSpeed documents as editable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return deepspeed


def _optimizer(model: Any, train: TrainConfig, lr: float, device: Any) -> Any:
    """AdamW without weight decay on biases and norms. torch's AdamW, not DeepSpeed's fused Adam (a JIT op):
    on GPUs its fused kernel (one launch for every tensor); with optimizer offload, DeepSpeedCPUAdam, which
    ZeRO-Offload requires."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=train.betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=train.betas, fused=device.type == "cuda" or None)


def _label_share(step_batches: list[dict[str, Any]], rt: Runtime) -> Any:
    """The divisor that makes each micro batch's summed loss a share of the step's token-weighted mean.

    DeepSpeed divides each micro batch's loss by the accumulation steps and averages gradients over ranks;
    dividing each summed loss by (labelled tokens of the whole step across ranks) / (accum x world) undoes
    both, so the step's gradient is that of the mean over every labelled token (transformers' loss takes it
    as `num_items_in_batch` and counts the labels it shifts the same way)."""
    import torch

    local = sum(int((b["labels"][..., 1:] != -100).sum()) for b in step_batches)
    (total,) = sum_across_ranks([float(local)], rt.device)
    return torch.tensor(max(total, 1.0) / (len(step_batches) * rt.world_size), device=rt.device)


def _start(reported: str | None, spec: LoopSpec) -> Start:
    """Resume (this fit's checkpoint, else the stage's choice), else continue from `init_checkpoint`, else 0."""
    if reported:  # whole: the runtime checked it
        return Start(reported, ckpt.read_state(reported))
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
    old_world = start.saved.world_size or world_size
    if start.folder is None or old_world == world_size:
        return cfg
    if not start.on_purpose:
        micro = start.saved.micro or cfg["train_micro_batch_size_per_gpu"]
        accum = start.saved.accum or cfg["gradient_accumulation_steps"]
        cfg = ds_config.keep_global_batch(cfg, micro * accum * old_world, world_size, stage, start.folder)
    if ckpt.partitioned(start.folder):
        cfg = ds_config.merge(cfg, {"checkpoint": {"load_universal": True}})
    return cfg


INIT_UNIVERSAL = "_work/init_universal"
"""Under the stage's `out_dir`: where an `init_from` checkpoint saved by another world size is converted to
DeepSpeed's universal form (its source, another stage's or run's commit, is only read); removed once loaded."""


def _loaded_state(engine: Any, rt: Runtime, spec: LoopSpec, start: Start, universal: bool) -> LoopState:
    """The checkpoint's weights, optimizer, RNG and loop state loaded into `engine` (a fresh state without one)."""
    if start.folder is None:
        return LoopState()
    if not universal:
        return ckpt.load(engine, start.folder, rt.rank)
    if not start.on_purpose:  # this stage's own checkpoint: converted beside its `ds/`, reused by a later resume
        return ckpt.load(engine, start.folder, rt.rank, ckpt.universal(start.folder, rt.rank))
    with _init_conversion(spec, rt) as into:
        return ckpt.load(engine, start.folder, rt.rank, ckpt.universal(start.folder, rt.rank, into))


@contextlib.contextmanager
def _init_conversion(spec: LoopSpec, rt: Runtime) -> Iterator[Path]:
    """A folder of this stage for the universal form of its `init_from` checkpoint, removed once every rank
    has loaded it (the weights and optimizer state are in memory then; a restart converts again)."""
    import torch.distributed as dist

    if spec.out_dir is None:  # a fit writing nowhere (tests, benchmarks)
        with tempfile.TemporaryDirectory(prefix="llmray-init-universal-") as tmp:
            yield Path(tmp)
        return
    into = Path(spec.out_dir) / INIT_UNIVERSAL
    yield into  # a load that fails leaves it: the next attempt reuses the conversion
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    shutil.rmtree(into, ignore_errors=True)
    with contextlib.suppress(OSError):  # `_work/` holds nothing else
        into.parent.rmdir()


def _continued(state: LoopState, rt: Runtime, spec: LoopSpec, start: Start, index: ShardIndex,
               micro: int) -> LoopState:
    """The loop state to continue from; with another world size, the data position mapped onto this one's
    ranks (`llm.train.data.rest_layout`): no micro-batch read twice or skipped."""
    if start.folder is None:
        return state
    if start.on_purpose and state.data_id != spec.data_id:  # new data: its first batch, steps carry on
        state.epoch, state.position, state.layout = 0, 0, None
        return state
    old_world = state.world_size or rt.world_size
    if old_world == rt.world_size:
        return state
    old_micro = state.micro or micro
    if old_micro != micro:  # batches of another size cannot be dealt out again: the same share of the epoch
        share = state.position / max(1, RankSlice(index, 0, old_world, old_micro).batches_per_epoch)
        state.position = int(share * RankSlice(index, 0, rt.world_size, micro).batches_per_epoch)
        state.layout = None
        return state
    saved_epoch = state.epoch
    state.accum = state.accum or 1
    state.epoch, state.position, state.layout = rest_layout(index.rows, state, rt.world_size, micro)
    if rt.rank == 0:
        print(f"{spec.stage}: step {state.step} of a {old_world}-worker run continues on {rt.world_size} "
              f"workers; the rest of epoch {saved_epoch} is dealt out again", flush=True)
    return state
