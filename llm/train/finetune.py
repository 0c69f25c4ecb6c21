"""The finetune stage: chat SFT of the pretrained model (or any local Hugging Face model), full or LoRA,
on Ray Train + DeepSpeed with the one loop; then the merge and a before/after evaluation.

Writes under `<storage>/<run>/finetune/`: `tokenizer/` (the base's, with pad and chat template), `sft/`
(examples rendered with that tokenizer, when the data stage's were made with another), `ray/attempt-<n>/`
(checkpoints), `metrics.jsonl`, `adapter/` (LoRA), `model/` (the fine-tuned or merged model),
`eval.json` (base and fine-tuned side by side), then the manifest. Resume and `--force` as in pretrain.

What differs from pretrain (the rest is `llm.train.recipe`): the model is a base read from a directory,
the data padded SFT rows, LoRA a model hook and an export hook; after the fit, the merge and evaluation run
on this machine (with `storage` in an object store, on checked local copies of what the workers uploaded).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import LLM_PREFIX, ModelConfig, PipelineConfig
from llm.data.sft import held_out
from llm.data.tokenizer import load_tokenizer
from llm.errors import ConfigError, StageInputError
from llm.eval import (
    DOCS,
    EvalSettings,
    HarnessSettings,
    conversation_text,
    evaluate_models,
    format_table,
    prompt_pairs,
    task_columns,
)
from llm.models.load import load_model
from llm.stage import Stage, StageResult, execute, stage_input
from llm.train import checkpoint as ckpt
from llm.train import lora, recipe
from llm.train.base_model import check_base
from llm.train.best_lr import with_best
from llm.train.data import data_shards
from llm.train.merge import merge_adapter
from llm.train.model import check_model_dir
from llm.train.sft import check_vocab, prepare_tokenizer, render_sources
from llm.train.spec import LoopSpec, train_fields

KEY = f"{LLM_PREFIX}.finetune"
SOURCES_KEY = f"{LLM_PREFIX}.data.sft.sources"


@dataclass
class Examples:
    """What fine-tuning reads: SFT shards (paths or store URIs), held-out conversations, how they were made."""

    train: list[str]
    val: list[str]
    convs: list[Any] = field(default_factory=list)
    """Held-out conversations, for generation prompts."""
    stats: dict[str, Any] = field(default_factory=dict)


def base_dir(cfg: PipelineConfig) -> Path:
    """The model to fine-tune: `finetune.base`, else the pretrain stage's export (a checked local copy);
    checked to hold a config, weights and a tokenizer that fit together and hold `max_len` tokens
    (`llm.train.base_model.check_base`), else a one-line error naming the key."""
    ft = cfg.finetune
    if ft.base is None:
        folder, key = stage_input(cfg, "pretrain").fetch("model"), f"{KEY}.base (default: the pretrain stage's model/)"
    else:
        folder, key = Path(ft.base), f"{KEY}.base"
    folder = check_model_dir(str(folder), key)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"{key}: {folder} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    max_len_key = f"{KEY}.max_len" if ft.max_len else f"{LLM_PREFIX}.data.sft.max_len"
    facts = check_base(folder, key, ft.max_len or cfg.data.sft.max_len, max_len_key)
    print(f"finetune: {facts.line()}", flush=True)
    return folder


def base_source(cfg: PipelineConfig, base: Path) -> str:
    """Where the workers read the base (and the manifest names it): the pretrain stage's `model/` where it
    is committed (a path or a store URI, never this machine's cache), else `finetune.base`."""
    return stage_input(cfg, "pretrain").path("model") if cfg.finetune.base is None else str(base)


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers turn every plain text into the same ids (same model and vocabulary)."""
    if getattr(a, "is_fast", False) and getattr(b, "is_fast", False):
        return bool(a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str())
    return bool(a.get_vocab() == b.get_vocab())


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers turn every text and conversation into the same ids (vocabulary and template)."""
    return same_vocabulary(a, b) and a.chat_template == b.chat_template


def examples(cfg: PipelineConfig, folder: storage.Folder, tok: Any) -> Examples:
    """The data stage's SFT shards when they were made with this very tokenizer, else the source records
    rendered again with it into `finetune/sft/`."""
    ft, sft = cfg.finetune, cfg.data.sft
    limit = ft.eval.prompts if ft.eval.enabled else 0
    if not ft.data:
        data = stage_input(cfg, "data")  # shards are read from where they are (a store included)
        train = data_shards(data, "train", "sft")
        if not train or not sft.sources:
            raise StageInputError(f"{data.path('sft', 'train')}: no SFT shards; set data.sft.sources and rerun "
                                  f"`llmray data`, or set {KEY}.data")
        if same_tokenizer(tok, load_tokenizer(data.fetch("tokenizer"))):
            convs = held_out(sft.sources, sft.val_fraction, SOURCES_KEY, limit=limit)
            return Examples(train, data_shards(data, "val", "sft"), convs, {"rendered": False})
    return _rendered(cfg, folder, tok, limit)


def chat_sources(cfg: PipelineConfig) -> tuple[list[str], float, str]:
    """The chat records fine-tuning renders, their held-out fraction and the key naming them: `finetune.data`,
    else the data stage's `data.sft.sources` (compress renders the same ones when there is no data stage)."""
    ft, sft = cfg.finetune, cfg.data.sft
    val_fraction = ft.val_fraction if ft.val_fraction is not None else sft.val_fraction
    return (ft.data or sft.sources), val_fraction, (f"{KEY}.data" if ft.data else SOURCES_KEY)


def _rendered(cfg: PipelineConfig, folder: storage.Folder, tok: Any, limit: int) -> Examples:
    """The sources rendered with `tok` into `<folder>/sft/`, published for workers on any node."""
    sources, val_fraction, key = chat_sources(cfg)
    out = folder.local / "sft"
    done = render_sources(tok, sources, out, cfg.finetune.max_len or cfg.data.sft.max_len, val_fraction, key)
    for d in done.dropped[:5]:
        print(f"finetune: dropped {d['record']}: {d['reason']}", flush=True)
    folder.publish("sft")

    def shards(split: str) -> list[str]:
        return [folder.path("sft", split, p.name) for p in sorted((out / split).glob("*.parquet"))]

    stats = {"rendered": True, **done.counts, "dropped": done.dropped[:20]}
    return Examples(shards("train"), shards("val"), done.val_records[:limit], stats)


def loop_spec(cfg: PipelineConfig, folder: storage.Folder, base: Path, tok: Any, ex: Examples) -> LoopSpec:
    """The loop's spec: padded SFT rows, the base loaded from its directory, LoRA as a model and export hook."""
    ft = cfg.finetune
    is_lora = ft.method == "lora"
    spec = LoopSpec(
        train=train_fields(ft),
        model=ModelConfig(path=base_source(cfg, base)),  # each worker's node copies a store URI into its cache
        vocab_size=_vocab_rows(base) or len(tok),
        seq_len=ft.max_len or cfg.data.sft.max_len,
        train_files=ex.train,
        columns=["input_ids", "labels"],
        pad_id=int(tok.pad_token_id),
        tokenizer_dir=folder.publish("tokenizer"),
        out_dir=folder.uri,
        stage="finetune",
        val_files=ex.val,
        model_hook=lora.apply if is_lora else None,
        export_hook=lora.export_adapter if is_lora else None,
        extra={"lora": ft.lora.model_dump(mode="json")},
    )
    return recipe.to_store(spec, folder)


def _vocab_rows(base: Path) -> int:
    return int(json.loads((base / "config.json").read_text()).get("vocab_size") or 0)


def prepare(cfg: PipelineConfig, folder: storage.Folder, base: Path) -> tuple[LoopSpec, Examples]:
    """The base's tokenizer and the examples prepared in `folder`, checked against the base's vocabulary."""
    tok = prepare_tokenizer(base, folder.local / "tokenizer")
    ex = examples(cfg, folder, tok)
    check_vocab(ex.train + ex.val, _vocab_rows(base), str(base))
    return loop_spec(cfg, folder, base, tok, ex), ex


def sweep_spec(cfg: PipelineConfig, folder: storage.Folder) -> LoopSpec:
    """The `LoopSpec` every sweep trial of `sweep.target: finetune` starts from: the same base, tokenizer and
    examples this stage would train on, prepared once under the sweep's folder (`tokenizer/`, `sft/`)."""
    spec, ex = prepare(cfg, folder, base_dir(cfg))
    if not ex.val:
        raise StageInputError(f"{folder.uri}: no held-out SFT examples to compare trials on; set "
                              f"{KEY}.val_fraction (or data.sft.val_fraction) above 0")
    return spec


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
                for k in h.keys():  # a safetensors handle is not a dict
                    n += int(math.prod(h.get_slice(k).get_shape()))
        return n

    total = count(sorted(base.glob("*.safetensors")))
    trainable = count([adapter / lora.ADAPTER_FILE]) if adapter else total
    return {"params": total, "trainable_params": trainable}


def evaluate(cfg: PipelineConfig, folder: storage.Folder, base: Path, ex: Examples,
             tuned: Path) -> list[dict[str, Any]]:
    """Base and fine-tuned model on the same held-out rows and prompts, with the same tokenizer (`eval.json`)."""
    from transformers import AutoTokenizer

    ft = cfg.finetune

    def loader(path: Path, device: str) -> tuple[Any, Any]:
        # The base directory may lack a pad token or chat template: both models use the prepared tokenizer.
        return load_model(path, device).model, AutoTokenizer.from_pretrained(str(folder.local / "tokenizer"))

    pairs, _ = prompt_pairs([{"messages": c} for c in ex.convs])
    harness = HarnessSettings.of(ft.eval.lm_eval, folder.local / "lm_eval",  # from the held-out conversations
                                 lambda: conversation_text(held_out(*chat_sources(cfg), limit=DOCS)),
                                 f"{KEY}.eval.lm_eval")
    settings = EvalSettings(sft_rows=ft.eval.sft_rows, max_new_tokens=ft.eval.max_new_tokens, measure_speed=False,
                            batch_size=8, harness=harness)
    rows = evaluate_models({"base": base, "finetuned": tuned}, sft_val=_local_val(cfg, folder, ex.val),
                           prompts=pairs, settings=settings, loader=loader)
    folder.write_text("eval.json", json.dumps(rows, indent=2))
    print(format_table(rows, ["model", "params", "sft_loss", "sft_ppl", "rouge_l", "bleu", "exact_match",
                              "token_f1", "prompts", *task_columns(rows)]), flush=True)
    return rows


def _local_val(cfg: PipelineConfig, folder: storage.Folder, val: list[str]) -> str | None:
    """The SFT val shards' folder on this machine: the ones rendered here, else the data stage's (a checked
    copy from a store)."""
    if not val:
        return None
    if (folder.local / "sft" / "val").is_dir():
        return str(folder.local / "sft" / "val")
    return str(stage_input(cfg, "data").fetch("sft", "val"))


def finish(cfg: PipelineConfig, folder: storage.Folder, base: Path, ex: Examples,
           metrics: dict[str, Any]) -> dict[str, Any]:
    """After the fit: LoRA's adapter merged here into `model/`, the summary, the before/after evaluation."""
    ft = cfg.finetune
    adapter = folder.fetch("adapter") if ft.method == "lora" else None
    if adapter is not None:  # merged on this machine into the stage folder (uploaded with the commit)
        tuned = merge_adapter(base, adapter, folder.local / "model", folder.local / "tokenizer")
    else:
        tuned = folder.fetch("model")
    summary = {**recipe.summary(folder, metrics, None), "method": ft.method, "base": base_source(cfg, base),
               "data": ex.stats, **param_counts(base, adapter)}
    recipe.print_summary(f"finetune ({ft.method}): {summary['steps']} steps, trainable "
                         f"{summary['trainable_params']:,} of {summary['params']:,} parameters", summary, folder,
                         {"model": "model"}, with_val=False)
    if ft.eval.enabled:
        for row in evaluate(cfg, folder, base, ex, tuned):
            prefix = "base_" if row["model"] == "base" else ""
            figures = ("sft_loss", "sft_ppl", "rouge_l", "bleu", "exact_match", "token_f1")
            summary.update({f"{prefix}{k}": row[k] for k in figures})
    return summary


def run(cfg: PipelineConfig, force: bool = False, **extra: Any) -> StageResult:
    """Finetune stage: skip if done, else render, train (resuming), export/merge, evaluate, commit.

    Args:
        cfg: the pipeline config.
        force: start over even when a finished or interrupted run exists (the old folder is kept aside).
        **extra: `LoopSpec` fields for tests and callers (e.g. `fail_at_step`).
    """
    cfg, lr_from = recipe.best_schedule(cfg, "finetune")
    base = base_dir(cfg)  # before any folder moves: a bad base is a one-line error at once

    def body(folder: storage.Folder) -> dict[str, Any]:
        spec, ex = prepare(cfg, folder, base)
        metrics = recipe.fit(cfg, recipe.job(cfg, "finetune"), replace(spec, **extra), folder)
        summary = finish(cfg, folder, base, ex, metrics)
        if lr_from is not None:  # the manifest names the sweep (and trial) the schedule came from
            summary["lr_from"] = lr_from
        return summary

    return execute(cfg, STAGE, body, inputs=recipe.inputs_with_sweep(inputs_of(cfg), lr_from), force=force)


STAGE = Stage("finetune", "chat fine-tuning (Ray Train + DeepSpeed)", run, sections=("finetune",),
              inputs=("data", "pretrain", "sweep"), resumable=True,
              as_run=with_best("finetune"), progress=ckpt.resume_detail)
