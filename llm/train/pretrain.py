"""The pretrain stage: Ray Train's `TorchTrainer` runs the one loop over the data stage's packed shards.

Writes under `<storage>/<run>/pretrain/`: `ray/attempt-<n>/` (one Ray Train run per start of the stage,
holding the DeepSpeed checkpoints), `metrics.jsonl`, `model/` (the exported Hugging Face directory),
then the manifest. Rerunning after an interruption picks the newest whole checkpoint of any attempt (a
damaged one is named and set aside) and starts a new attempt from it; `--force` starts over. What differs
from the other training stages: the model is built from `pretrain.model` (or continued from `init_from`)
and reads packed text; the rest is the recipe's (`llm.train.recipe`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import LLM_PREFIX, ModelConfig, PipelineConfig
from llm.data.tokenizer import check_model_vocab
from llm.errors import ConfigError
from llm.manifest import manifest_hash
from llm.stage import Stage, StageResult, execute, stage_input
from llm.train import checkpoint as ckpt
from llm.train import recipe
from llm.train.best_lr import with_best
from llm.train.data import data_shards
from llm.train.fit import outside_run, resolve_init
from llm.train.model import check_build, check_model_dir
from llm.train.spec import LoopSpec, train_fields

KEY = f"{LLM_PREFIX}.pretrain"


def loop_spec(cfg: PipelineConfig, folder: storage.Folder, data: storage.Folder) -> LoopSpec:
    """The loop's spec for this stage, writing into `folder`, reading the data stage's folder `data`."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(data.fetch("tokenizer")))
    model = model_section(cfg)
    if model.path is not None and storage.Folder(model.path).on_disk:  # a store URI: checked by its worker copy
        check_model_vocab(model.path, tokenizer, f"{KEY}.model.path")
    train_files = data_shards(data, "train")
    first = pq.ParquetFile(train_files[0]).read_row_group(0, columns=["input_ids"]).column(0)
    spec = LoopSpec(
        train=train_fields(cfg.pretrain),
        model=model,
        vocab_size=len(tokenizer),
        seq_len=len(first[0]),  # what the data stage packed, whatever the config says now
        train_files=train_files,
        tokenizer_dir=data.path("tokenizer"),
        out_dir=folder.uri,
        stage="pretrain",
        val_files=data_shards(data, "val"),
        data_id=manifest_hash(data.uri) or "",
    )
    return recipe.to_store(spec, folder)


def model_section(cfg: PipelineConfig) -> ModelConfig:
    """The spec's model; a `pretrain.model.path` on this machine's disk is checked here, on the driver, and
    made absolute (the workers' cwd is not the driver's). A store URI is left to the worker's cached copy.
    A model to build has its family's config made here once (a `config_file` made absolute)."""
    model = cfg.pretrain.model
    if model.path is None:
        return check_build(model, f"{KEY}.model")
    if storage.Folder(model.path).on_disk:
        model = model.model_copy(update={"path": str(check_model_dir(model.path, f"{KEY}.model.path"))})
    return model


def fit(cfg: PipelineConfig, folder: storage.Folder, init: str | None = None, **extra: Any) -> dict[str, Any]:
    """Run (or resume) training into `folder`; returns the final metrics. `extra`: `LoopSpec` fields."""
    data = stage_input(cfg, "data")
    if not data_shards(data, "train"):
        raise ConfigError(f"{data.path('packed', 'train')}: no parquet shards; rerun `llmray data`")
    spec = replace(loop_spec(cfg, folder, data), **_init_fields(cfg, init), **extra)
    return recipe.fit(cfg, recipe.job(cfg, "pretrain"), spec, folder)


def _init_fields(cfg: PipelineConfig, init: str | None) -> dict[str, Any]:
    """LoopSpec fields for `pretrain.init_from`: a checkpoint to continue, or a model directory to load."""
    if init is None:
        return {}
    kind, path = resolve_init(init, f"{KEY}.init_from")
    if kind == "checkpoint":
        return {"init_checkpoint": path}
    return {"model": cfg.pretrain.model.model_copy(update={"path": path})}


def run(cfg: PipelineConfig, force: bool = False, **extra: Any) -> StageResult:
    """Pretrain stage: skip if done, else train (resuming an interrupted run), export, commit.

    Args:
        cfg: the pipeline config.
        force: start over even when a finished or interrupted run exists (the old folder is kept aside).
        **extra: `LoopSpec` fields for tests and callers (e.g. `fail_at_step`).
    """
    model_section(cfg)  # a bad model.path is one line now, before the sweep's winner is read or a folder moves
    cfg, lr_from = recipe.best_schedule(cfg, "pretrain")
    init = cfg.pretrain.init_from
    if init is not None:  # resolve before the folder may move aside: `init_from` may point into it
        init = str(Path(init).expanduser().resolve())
        resolve_init(init, f"{KEY}.init_from")
        warning = outside_run(cfg, init, f"{KEY}.init_from")
        if warning:
            print(warning, flush=True)
    moved: dict[str, str] = {}

    def remap(old: Path, new: Path) -> None:
        if init is not None and Path(init).is_relative_to(old):
            moved["init"] = str(new / Path(init).relative_to(old))

    def body(folder: storage.Folder) -> dict[str, Any]:
        summary = recipe.summary(folder, fit(cfg, folder, moved.get("init", init), **extra), lr_from)
        recipe.print_summary(f"pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens", summary, folder,
                             {"model": "model", "metrics": "metrics.jsonl"})
        return summary

    return execute(cfg, STAGE, body, inputs=recipe.inputs_with_sweep(("data",), lr_from), force=force,
                   on_set_aside=remap)


STAGE = Stage("pretrain", "train the model (Ray Train + DeepSpeed)", run, sections=("pretrain",),
              inputs=("data", "sweep"), resumable=True,
              as_run=with_best("pretrain"), progress=ckpt.resume_detail)
