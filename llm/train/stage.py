"""The pretrain stage: Ray Train's `TorchTrainer` runs the one loop over the data stage's packed shards.

Writes under `<storage>/<run>/pretrain/`: `ray/attempt-<n>/` (one Ray Train run per start of the stage,
holding the DeepSpeed checkpoints), `metrics.jsonl`, `model/` (the exported Hugging Face directory),
then the manifest. Rerunning after an interruption picks the newest whole checkpoint of any attempt (a
damaged one is named and set aside) and starts a new attempt from it; `--force` starts over.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import PipelineConfig
from llm.errors import ConfigError
from llm.stage import Stage, StageResult, execute, input_dir, input_uri, target
from llm.train import checkpoint as ckpt
from llm.train import ds_config
from llm.train.data import shard_files
from llm.train.fit import fit_with_ray, resolve_init, resume_point
from llm.train.loop import LoopSpec
from llm.train.metrics import training_summary
from llm.train.model import check_model_dir
from llm.tune.best import with_best

RAY_DIR = "ray"


def loop_spec(cfg: PipelineConfig, folder: Path, data: Path | str, **extra: Any) -> LoopSpec:
    """The loop's plain-dict config for this stage (`data`: the data stage's folder, a path or a store URI)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from llm.manifest import manifest_hash

    remote = storage.is_remote(data)
    local_tok = input_dir(cfg, "data", parts=("tokenizer",)) / "tokenizer" if remote else Path(data) / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(local_tok))
    train_files = data_shards(data, "train")
    first = pq.ParquetFile(train_files[0]).read_row_group(0, columns=["input_ids"]).column(0)
    pre = cfg.pretrain
    spec = LoopSpec(
        train=pre.model_dump(mode="json", exclude={"model"}),
        model=model_section(cfg),
        vocab_size=len(tokenizer),
        seq_len=len(first[0]),  # what the data stage packed, whatever the config says now
        train_files=train_files,
        tokenizer_dir=storage.join(data, "tokenizer") if remote else str(local_tok),
        out_dir=str(folder),
        stage="pretrain",
        val_files=data_shards(data, "val"),
        data_id=manifest_hash(data) or "",
        **extra,
    )
    return to_store(spec, target(folder))


def model_section(cfg: PipelineConfig) -> dict[str, Any]:
    """The spec's model fields; a local `pretrain.model.path` is checked here, on the driver, and made
    absolute (the workers' cwd is not the driver's). A store URI is left to the worker's cached copy."""
    model = cfg.pretrain.model.model_dump(mode="json")
    if model["path"] is not None and not storage.is_remote(model["path"]):
        model["path"] = str(check_model_dir(model["path"], "metadata.llm.pretrain.model.path"))
    return model


def to_store(spec: LoopSpec, store: str) -> LoopSpec:
    """With `store` in an object store, the workers write on their own nodes and upload there
    (`store_loop_per_worker`); a local `store` leaves the spec as it is."""
    if storage.is_remote(store):
        spec.out_dir = str(storage.cache_dir() / "out" / hashlib.sha256(store.encode()).hexdigest()[:16])
        spec.extra = {**spec.extra, "store": store}
    return spec


def data_shards(data: Path | str, split: str, kind: str = "packed") -> list[str]:
    """The parquet shards of `<data>/<kind>/<split>/` (local, or URIs in an object store: read directly)."""
    if not storage.is_remote(data):
        return shard_files(data, split, kind)
    base = storage.join(data, kind, split)
    return sorted(storage.join(base, rel) for rel in storage.list_files(base) if rel.endswith(".parquet")
                  and "/" not in rel)


def fit(cfg: PipelineConfig, folder: Path, init: str | None = None, **extra: Any) -> dict[str, Any]:
    """Run (or resume) training into `folder`; returns the final metrics."""
    from llm.sizing import planned

    data = input_uri(cfg, "data")
    if not data_shards(data, "train"):
        raise ConfigError(f"{data}/packed/train: no parquet shards; rerun `llmray data`")
    pre = cfg.pretrain
    sizing = planned(cfg).pretrain
    ds_config.build(pre, max(1, sizing.workers))  # a bad `pretrain.deepspeed` fails here, before any worker
    init_fields = _init_fields(cfg, init)
    spec = loop_spec(cfg, folder, data, **init_fields, **extra)
    store = target(folder)
    root: Path | str = storage.join(store, RAY_DIR) if storage.is_remote(store) else folder / RAY_DIR
    spec.resume_from = resume_point(root, pre.keep_checkpoints, "pretrain")
    if sizing.workers < 1:
        if storage.is_remote(store):
            raise ConfigError(f"metadata.llm.pretrain.sizing.workers: 0 trains without Ray and needs a local "
                              f"`storage` (got {cfg.storage})")
        return _fit_local(spec, Path(root), pre.keep_checkpoints)
    metrics = fit_with_ray(cfg, "pretrain", spec, sizing, root, pre.keep_checkpoints, pre.max_failures)
    if storage.is_remote(store):  # the records the summary reads, from the store (rank 0 uploaded them)
        folder.joinpath("metrics.jsonl").write_bytes(storage.read_bytes(storage.join(store, "metrics.jsonl")))
    return metrics


def _init_fields(cfg: PipelineConfig, init: str | None) -> dict[str, Any]:
    """LoopSpec fields for `pretrain.init_from`: a checkpoint to continue, or a model directory to load."""
    if init is None:
        return {}
    kind, path = resolve_init(init, "metadata.llm.pretrain.init_from")
    if kind == "checkpoint":
        return {"init_checkpoint": path}
    return {"model": {**cfg.pretrain.model.model_dump(mode="json"), "path": path}}


def _fit_local(spec: LoopSpec, root: Path, keep: int) -> dict[str, Any]:
    """`sizing.workers: 0`: the same loop in this process, no Ray."""
    from llm.train.loop import run_loop
    from llm.train.runtime import LocalRuntime

    return run_loop(spec, LocalRuntime(checkpoint_root=str(root), keep=keep))


def run(cfg: PipelineConfig, force: bool = False, **extra: Any) -> StageResult:
    """Pretrain stage: skip if done, else train (resuming an interrupted run), export, commit.

    Args:
        cfg: the pipeline config.
        force: start over even when a finished or interrupted run exists (the old folder is kept aside).
        **extra: `LoopSpec` fields for tests and callers (e.g. `fail_at_step`).
    """
    model_section(cfg)  # a bad model.path is one line now, before the sweep's winner is read or a folder moves
    lr_from = None
    if cfg.pretrain.lr == "best":  # the sweep's winner; the hash below covers that schedule, not "best"
        from llm.tune.best import apply_best, describe

        cfg, lr_from = apply_best(cfg, "pretrain")
        print(f"pretrain: {describe(lr_from or {})}", flush=True)
    init = cfg.pretrain.init_from
    if init is not None:  # resolve before the folder may move aside: `init_from` may point into it
        init = str(Path(init).expanduser().resolve())
        resolve_init(init, "metadata.llm.pretrain.init_from")
    moved: dict[str, str] = {}

    def remap(old: Path, new: Path) -> None:
        if init is not None and Path(init).is_relative_to(old):
            moved["init"] = str(new / Path(init).relative_to(old))

    def body(folder: Path) -> dict[str, Any]:
        metrics = fit(cfg, folder, moved.get("init", init), **extra)
        summary = training_summary(folder, metrics)
        if lr_from is not None:  # the manifest names the sweep (and trial) the schedule came from
            summary["lr_from"] = lr_from
        line = f"pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens"
        if summary["first_loss"] is not None:
            line += f", loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
        if summary["val_ppl"] is not None:
            line += f", val loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.1f})"
        out = target(folder)
        print(f"{line}\n  model: {storage.join(out, 'model')}\n  metrics: {storage.join(out, 'metrics.jsonl')}",
              flush=True)
        return summary

    inputs = ("data", "sweep") if lr_from is not None else ("data",)
    return execute(cfg, STAGE, body, inputs=inputs, force=force, on_set_aside=remap)


STAGE = Stage("pretrain", "train the model (Ray Train + DeepSpeed)", run, sections=("pretrain",),
              inputs=("data", "sweep"), resumable=True,
              as_run=with_best("pretrain"), progress=ckpt.resume_detail)
