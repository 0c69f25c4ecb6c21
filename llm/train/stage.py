"""The pretrain stage: Ray Train's `TorchTrainer` runs the one loop over the data stage's packed shards.

Writes under `<storage>/<run>/pretrain/`: `ray/` (Ray Train's run folder with the DeepSpeed
checkpoints), `metrics.jsonl`, `model/` (the exported Hugging Face directory), then the manifest.
Ray Train V2 restores a run whose `RunConfig(storage_path, name)` folder already exists, so rerunning
after an interruption continues from the last checkpoint; `--force` clears the folder first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm.config import PipelineConfig
from llm.errors import ConfigError
from llm.stage import StageResult, execute, input_dir
from llm.train import ds_config
from llm.train.data import shard_files
from llm.train.loop import LoopSpec

RAY_RUN_NAME = "ray"


def train_sizing(cfg: PipelineConfig) -> Any:
    """`TrainSizing` of the pretrain stage. The stage holds only a `PipelineConfig`, so the figures come
    from the connected cluster's nodes (`llm.sizing.live_train_sizing`); `pretrain.sizing` overrides win."""
    from llm.raycluster import connect
    from llm.sizing import live_train_sizing

    pre = cfg.pretrain.sizing
    if pre.workers == 0:
        return _NoRay()
    connect(cfg)
    return live_train_sizing(cfg, pre)


class _NoRay:
    """Sizing of `sizing.workers: 0`: the loop runs in this process."""

    workers = 0


def loop_spec(cfg: PipelineConfig, folder: Path, data: Path, **extra: Any) -> LoopSpec:
    """The loop's plain-dict config for this stage."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    pre = cfg.pretrain
    return LoopSpec(
        train=pre.model_dump(mode="json", exclude={"model"}),
        model=pre.model.model_dump(mode="json"),
        vocab_size=len(tokenizer),
        seq_len=cfg.data.seq_len,
        tokenizer_dir=str(data / "tokenizer"),
        out_dir=str(folder),
        stage="pretrain",
        val_files=shard_files(data, "val"),
        **extra,
    )


def fit(cfg: PipelineConfig, folder: Path, sizing: Any = None, **extra: Any) -> dict[str, Any]:
    """Run (or resume) Ray Train into `folder`; returns the final metrics."""
    from llm.raycluster import connect
    from llm.train.data import ray_datasets

    data = input_dir(cfg, "data")
    if not shard_files(data, "train"):
        raise ConfigError(f"{data}/packed/train: no parquet shards; rerun `llmray data`")
    pre = cfg.pretrain
    sizing = sizing or train_sizing(cfg)
    if sizing.workers < 1:
        return _fit_local(cfg, folder, data, **extra)
    ds_config.build(pre, sizing.workers)  # a bad `pretrain.deepspeed` fails here, before any worker starts
    spec = loop_spec(cfg, folder, data, **extra)
    connect(cfg)
    trainer = build_trainer(spec, sizing.scaling_config_kwargs(), folder, ray_datasets(data)["train"],
                            keep_checkpoints=pre.keep_checkpoints, max_failures=pre.max_failures)
    result = trainer.fit()
    return dict(result.metrics or {})


def build_trainer(spec: LoopSpec, scaling: dict[str, Any], folder: Path, train_ds: Any, keep_checkpoints: int,
                  max_failures: int) -> Any:
    """The `TorchTrainer` that runs the one loop: Ray Train's run folder is `<folder>/ray`, so a rerun into
    the same folder restores it; `train_ds` streams in order to every worker."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from llm.train.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.to_dict(),
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(folder.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": train_ds},
        # Every worker reads the whole ordered stream and keeps its rank's rows (llm.train.data).
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=_ordered()),
    )


def _ordered() -> Any:
    """Ray Train's ingest options with `preserve_order`: Train replaces each dataset's own options, and
    the data position in a checkpoint means something only if every run reads the same order."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _fit_local(cfg: PipelineConfig, folder: Path, data: Path, **extra: Any) -> dict[str, Any]:
    """`sizing.workers: 0`: the same loop in this process, no Ray, reading parquet directly."""
    from llm.train.data import parquet_batches
    from llm.train.loop import LocalRuntime, run_loop

    spec = loop_spec(cfg, folder, data, **extra)
    rt = LocalRuntime(lambda split, rows: parquet_batches(shard_files(data, split), rows),
                      checkpoint_dir=str(folder / "checkpoint"))
    return run_loop(spec, rt)


def _summary(folder: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metrics: last train loss, best and last validation, tokens, first loss."""
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r for r in records if "val_loss" in r]
    out = {"steps": records[-1]["step"] if records else 0, "tokens": records[-1]["tokens"] if records else 0,
           "first_loss": records[0]["loss"] if records else None, "final_loss": metrics.get("loss"),
           "val_loss": vals[-1]["val_loss"] if vals else None, "val_ppl": vals[-1]["val_ppl"] if vals else None,
           "mean_mfu": sum(r["mfu"] for r in records) / len(records) if records else None}
    return out


def run(cfg: PipelineConfig, force: bool = False, **extra: Any) -> StageResult:
    """Pretrain stage: skip if done, else train (resuming an interrupted run), export, commit.

    Args:
        cfg: the pipeline config.
        force: start over even when a finished or interrupted run exists.
        **extra: `LoopSpec` fields for tests and callers (e.g. `fail_at_step`).
    """
    def body(folder: Path) -> dict[str, Any]:
        metrics = fit(cfg, folder, **extra)
        summary = _summary(folder, metrics)
        line = (f"pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens, loss {summary['first_loss']:.4f}"
                f" -> {summary['final_loss']:.4f}")
        if summary["val_ppl"] is not None:
            line += f", val loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.1f})"
        print(f"{line}\n  model: {folder / 'model'}\n  metrics: {folder / 'metrics.jsonl'}", flush=True)
        return summary

    return execute(cfg, "pretrain", body, sections=("data", "pretrain"), inputs=("data",), force=force,
                   keep_partial=True)
