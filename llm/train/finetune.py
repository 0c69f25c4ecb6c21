"""The finetune stage: chat SFT of the pretrained model (or any local Hugging Face model), full or LoRA,
on Ray Train + DeepSpeed with the one loop; then the merge and a before/after evaluation.

Writes under `<storage>/<run>/finetune/`: `tokenizer/` (the base's, with pad and chat template), `sft/`
(examples rendered with that tokenizer, when the data stage's were made with another), `ray/attempt-<n>/`
(checkpoints), `metrics.jsonl`, `adapter/` (LoRA), `model/` (the fine-tuned or merged model),
`eval.json` (base and fine-tuned side by side), then the manifest. Resume and `--force` as in pretrain.

With `storage` in an object store the workers read the base and the shards from the store (each node keeps
a checked cache copy of the base), the driver's tokenizer and rendered examples are uploaded before the
workers start, the workers upload their outputs, and the merge and evaluation run on local copies.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import PipelineConfig, TrainConfig
from llm.errors import ConfigError, StageInputError
from llm.stage import Stage, StageResult, execute, input_dir, input_uri, target
from llm.train import checkpoint as ckpt
from llm.train import ds_config
from llm.train.fit import fit_with_ray, resume_point
from llm.train.loop import LoopSpec
from llm.train.metrics import training_summary
from llm.train.model import check_model_dir
from llm.train.sft import check_vocab, held_out, prepare_tokenizer, render_sources
from llm.tune.best import with_best

RAY_DIR = "ray"
KEY = "metadata.llm.finetune"


def base_dir(cfg: PipelineConfig) -> Path:
    """The model to fine-tune: `finetune.base`, else the pretrain stage's export; checked to hold a config,
    weights and a tokenizer, else a one-line error naming the key."""
    ft = cfg.finetune
    if ft.base is None:
        folder = input_dir(cfg, "pretrain", parts=("model",)) / "model"  # a checked cache copy from a store
        key = f"{KEY}.base (default: the pretrain stage's model/)"
    else:
        folder, key = Path(ft.base), f"{KEY}.base"
    folder = check_model_dir(str(folder), key)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"{key}: {folder} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    return folder


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers turn every text into the same ids (same model, vocabulary and template)."""
    if getattr(a, "is_fast", False) and getattr(b, "is_fast", False):
        same = a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    else:
        same = a.get_vocab() == b.get_vocab()
    return same and a.chat_template == b.chat_template


def examples(cfg: PipelineConfig, folder: Path, tok: Any) -> tuple[list[str], list[str], list[Any], dict[str, Any]]:
    """(train shards, val shards, held-out conversations, stats): the data stage's SFT shards when they were
    made with this very tokenizer, else the source records rendered again with it into `finetune/sft/`."""
    ft, sft = cfg.finetune, cfg.data.sft
    val_fraction = ft.val_fraction if ft.val_fraction is not None else sft.val_fraction
    limit = ft.eval.prompts if ft.eval.enabled else 0
    if not ft.data:
        from llm.data.tokenizer import load_tokenizer
        from llm.train.stage import data_shards

        data = input_uri(cfg, "data")  # shards are read from where they are (a store included)
        train = data_shards(data, "train", "sft")
        if not train or not sft.sources:
            raise StageInputError(f"{data}/sft/train: no SFT shards; set data.sft.sources and rerun `llmray data`, "
                                  f"or set {KEY}.data")
        if same_tokenizer(tok, load_tokenizer(input_dir(cfg, "data", parts=("tokenizer",)))):
            convs = held_out(sft.sources, sft.val_fraction, "metadata.llm.data.sft.sources")[:limit]
            return train, data_shards(data, "val", "sft"), convs, {"rendered": False}
    sources = ft.data or sft.sources
    key = f"{KEY}.data" if ft.data else "metadata.llm.data.sft.sources"
    out = folder / "sft"
    done = render_sources(tok, sources, out, ft.max_len or sft.max_len, val_fraction, key)
    stats = {"rendered": True, **done.counts, "dropped": done.dropped[:20]}
    for d in done.dropped[:5]:
        print(f"finetune: dropped {d['record']}: {d['reason']}", flush=True)
    store = target(folder)
    if storage.is_remote(store):  # workers on any node read them from the store
        storage.upload(out, storage.join(store, "sft"))
    return [storage.join(store, p.relative_to(folder).as_posix()) for p in sorted((out / "train").glob("*.parquet"))], \
        [storage.join(store, p.relative_to(folder).as_posix()) for p in sorted((out / "val").glob("*.parquet"))], \
        done.val_records[:limit], stats


def loop_spec(cfg: PipelineConfig, folder: Path, base: Path, tok: Any, train: list[str], val: list[str],
              **extra: Any) -> LoopSpec:
    """The loop's plain-dict config: padded SFT rows, the base loaded from its directory, LoRA as a hook."""
    from llm.train.stage import to_store

    ft = cfg.finetune
    vocab = int(json.loads((base / "config.json").read_text()).get("vocab_size") or len(tok))
    lora = ft.method == "lora"
    store = target(folder)
    model, tokenizer = str(base), str(folder / "tokenizer")
    if storage.is_remote(store):  # each worker's node copies them from the store into its cache
        storage.upload(folder / "tokenizer", storage.join(store, "tokenizer"))
        tokenizer = storage.join(store, "tokenizer")
        if ft.base is None:
            model = storage.join(input_uri(cfg, "pretrain"), "model")
    spec = LoopSpec(
        train=ft.model_dump(mode="json", include=set(TrainConfig.model_fields)),
        model={"path": model},
        vocab_size=vocab,
        seq_len=ft.max_len or cfg.data.sft.max_len,
        train_files=train,
        columns=["input_ids", "labels"],
        pad_id=int(tok.pad_token_id),
        tokenizer_dir=tokenizer,
        out_dir=str(folder),
        stage="finetune",
        val_files=val,
        model_hook="llm.train.lora:apply" if lora else None,
        export_hook="llm.train.lora:export_adapter" if lora else None,
        extra={"lora": ft.lora.model_dump(mode="json")},
        **extra,
    )
    return to_store(spec, store)


def fit(cfg: PipelineConfig, spec: LoopSpec, folder: Path) -> dict[str, Any]:
    """Run (or resume from the newest whole checkpoint) the one loop for this stage."""
    from llm.sizing import planned

    ft = cfg.finetune
    sizing = planned(cfg).finetune
    ds_config.build(ft, max(1, sizing.workers), "finetune")  # a bad `finetune.deepspeed` fails before any worker
    store = target(folder)
    root: Path | str = storage.join(store, RAY_DIR) if storage.is_remote(store) else folder / RAY_DIR
    spec.resume_from = resume_point(root, ft.keep_checkpoints, "finetune")
    if sizing.workers < 1 and storage.is_remote(store):
        raise ConfigError(f"{KEY}.sizing.workers: 0 trains without Ray and needs a local `storage` "
                          f"(got {cfg.storage})")
    if sizing.workers < 1:
        from llm.train.loop import run_loop
        from llm.train.runtime import LocalRuntime

        return run_loop(spec, LocalRuntime(checkpoint_root=str(root), keep=ft.keep_checkpoints))
    metrics = fit_with_ray(cfg, "finetune", spec, sizing, root, ft.keep_checkpoints, ft.max_failures)
    if storage.is_remote(store):  # the records the summary reads, from the store (rank 0 uploaded them)
        folder.joinpath("metrics.jsonl").write_bytes(storage.read_bytes(storage.join(store, "metrics.jsonl")))
    return metrics


def sweep_spec(cfg: PipelineConfig, folder: Path) -> LoopSpec:
    """The `LoopSpec` every sweep trial of `sweep.target: finetune` starts from: the same base, tokenizer and
    examples this stage would train on, prepared once under the sweep's folder (`tokenizer/`, `sft/`)."""
    base = base_dir(cfg)
    tok = prepare_tokenizer(base, folder / "tokenizer")
    train, val, _, _ = examples(cfg, folder, tok)
    if not val:
        raise StageInputError(f"{folder}: no held-out SFT examples to compare trials on; set "
                              f"{KEY}.val_fraction (or data.sft.val_fraction) above 0")
    check_vocab(train + val, int(json.loads((base / "config.json").read_text()).get("vocab_size", 0)), str(base))
    return loop_spec(cfg, folder, base, tok, train, val)


def inputs_of(cfg: PipelineConfig) -> tuple[str, ...]:
    """The earlier stages fine-tuning reads: the data stage's SFT shards unless `finetune.data` names its own,
    the pretrain stage's model unless `finetune.base` names one."""
    ft = cfg.finetune
    return tuple(name for name, used in (("data", not ft.data), ("pretrain", ft.base is None)) if used)


def param_counts(base: Path, adapter: Path | None) -> dict[str, int]:
    """Parameters of the base (from its files' headers) and trainable ones (the adapter's, else all)."""
    from safetensors import safe_open

    def count(files: list[Path]) -> int:
        n = 0
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                    shape = h.get_slice(k).get_shape()
                    n += int(__import__("math").prod(shape))
        return n

    total = count(sorted(base.glob("*.safetensors")))
    trainable = count([adapter / "adapter_model.safetensors"]) if adapter else total
    return {"params": total, "trainable_params": trainable}


def evaluate(cfg: PipelineConfig, folder: Path, base: Path, val: list[str], convs: list[Any],
             tuned: Path | None = None) -> list[dict[str, Any]]:
    """Base and fine-tuned model on the same held-out rows and prompts, with the same tokenizer (`eval.json`)."""
    from transformers import AutoTokenizer

    from llm.eval import EvalSettings, evaluate_models, format_table, prompt_pairs

    ft = cfg.finetune

    def loader(path: Path, device: str) -> tuple[Any, Any]:
        from llm.compress.load import load_model

        # The base directory may lack a pad token or chat template: both models use the prepared tokenizer.
        return load_model(path, device).model, AutoTokenizer.from_pretrained(str(folder / "tokenizer"))

    pairs, _ = prompt_pairs([{"messages": c} for c in convs])
    settings = EvalSettings(sft_rows=ft.eval.sft_rows, max_new_tokens=ft.eval.max_new_tokens, measure_speed=False,
                            batch_size=8)
    rows = evaluate_models({"base": base, "finetuned": tuned or folder / "model"},
                           sft_val=_local_val(cfg, folder, val), prompts=pairs, settings=settings,
                           loader=loader)
    (folder / "eval.json").write_text(json.dumps(rows, indent=2))
    print(format_table(rows, ["model", "params", "sft_loss", "sft_ppl", "rouge_l", "bleu", "exact_match",
                              "prompts"]), flush=True)
    return rows


def _local_val(cfg: PipelineConfig, folder: Path, val: list[str]) -> str | None:
    """The SFT val shards' folder on this machine: as is locally; from a store, the rendered ones staged in
    `folder/sft/val`, else a checked cache copy of the data stage's."""
    if not val:
        return None
    if not storage.is_remote(val[0]):
        return str(Path(val[0]).parent)
    if (folder / "sft" / "val").is_dir():
        return str(folder / "sft" / "val")
    return str(input_dir(cfg, "data", parts=("sft/val",)) / "sft" / "val")


def _outputs(folder: Path, rel: str, scratch: Path) -> Path:
    """A folder the workers wrote (`adapter/`, `model/`): itself with local storage, else copied from the
    store into `scratch` (the driver merges and evaluates local files)."""
    store = target(folder)
    if not storage.is_remote(store):
        return folder / rel
    return storage.download(storage.join(store, rel), scratch / rel)


def run(cfg: PipelineConfig, force: bool = False, **extra: Any) -> StageResult:
    """Finetune stage: skip if done, else render, train (resuming), export/merge, evaluate, commit.

    Args:
        cfg: the pipeline config.
        force: start over even when a finished or interrupted run exists (the old folder is kept aside).
        **extra: `LoopSpec` fields for tests and callers (e.g. `fail_at_step`).
    """
    lr_from = None
    if cfg.finetune.lr == "best":  # the sweep's winner; the hash below covers that schedule, not "best"
        from llm.tune.best import apply_best, describe

        cfg, lr_from = apply_best(cfg, "finetune")
        print(f"finetune: {describe(lr_from or {})}", flush=True)
    ft = cfg.finetune
    inputs = inputs_of(cfg) + (("sweep",) if lr_from is not None else ())
    base = base_dir(cfg)  # before any folder moves: a bad base is a one-line error at once
    remote_base = ft.base is None and storage.is_remote(cfg.stage_dir("pretrain"))
    base_name = storage.join(input_uri(cfg, "pretrain"), "model") if remote_base else str(base)  # not the cache

    def body(folder: Path) -> dict[str, Any]:
        tok = prepare_tokenizer(base, folder / "tokenizer")
        train, val, convs, data_stats = examples(cfg, folder, tok)
        check_vocab(train + val, int(json.loads((base / "config.json").read_text()).get("vocab_size", 0)), str(base))
        metrics = fit(cfg, loop_spec(cfg, folder, base, tok, train, val, **extra), folder)
        with tempfile.TemporaryDirectory(prefix="llmray-finetune-") as scratch:
            return finish(folder, metrics, val, convs, data_stats, Path(scratch))

    def finish(folder: Path, metrics: dict[str, Any], val: list[str], convs: list[Any], data_stats: dict[str, Any],
               scratch: Path) -> dict[str, Any]:
        from llm.train.merge import merge_adapter

        adapter = _outputs(folder, "adapter", scratch) if ft.method == "lora" else None
        if adapter is not None:  # merged on this machine into the stage folder (uploaded with the commit)
            merge_adapter(base, adapter, folder / "model", folder / "tokenizer")
            tuned = folder / "model"
        else:
            tuned = _outputs(folder, "model", scratch)
        summary = {**training_summary(folder, metrics), "method": ft.method, "base": base_name, "data": data_stats,
                   **param_counts(base, adapter)}
        if lr_from is not None:  # the manifest names the sweep (and trial) the schedule came from
            summary["lr_from"] = lr_from
        line = (f"finetune ({ft.method}): {summary['steps']} steps, trainable {summary['trainable_params']:,} of "
                f"{summary['params']:,} parameters")
        if summary["first_loss"] is not None:
            line += f", loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
        print(f"{line}\n  model: {storage.join(target(folder), 'model')}", flush=True)
        if ft.eval.enabled:
            rows = evaluate(cfg, folder, base, val, convs, tuned)
            for row in rows:
                prefix = "base_" if row["model"] == "base" else ""
                summary.update({f"{prefix}{k}": row[k] for k in ("sft_loss", "sft_ppl", "rouge_l", "bleu",
                                                                  "exact_match")})
        return summary

    return execute(cfg, STAGE, body, inputs=inputs, force=force)


STAGE = Stage("finetune", "chat fine-tuning (Ray Train + DeepSpeed)", run, sections=("finetune",),
              inputs=("data", "pretrain", "sweep"), resumable=True,
              as_run=with_best("finetune"), progress=ckpt.resume_detail)
