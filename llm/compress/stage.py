"""The compress stage: variants of the fine-tuned (else pretrained) model, one eval table, one choice.

Writes under `<storage>/<run>/compress/`: `<variant>/` for each of `compress.variants` (each opens with
`llm.models.load.load_model`), `_work/` (distillation runs with their checkpoints, intermediate models a
variant is built from but that is not listed itself, and chat records rendered here when no earlier stage
holds tokens in the original's tokenizer), `eval.json` (the original and every variant on the same tokens and
prompts), `chosen.json` (the variant the rule picks, with its figures beside the original's, read by the
serve stage), then the manifest. A rerun after an interruption keeps the variants already finished and
checked.

The tokens come from `llm.compress.tokens`: the data stage's when it tokenized with the original's tokenizer,
else the fine-tuning data as finetune rendered it with the base's tokenizer, else the chat records rendered
here; a user who brings a base and chat data needs no data stage.

With `storage` in an object store the original comes from a checked cache copy of its committed folder and
shards are read from the store (only the val splits are copied, for the table); int8 and pruned variants are
built here and each is uploaded as soon as it is checked (its `.done` object last, so an interrupted stage
keeps it); distillation runs on Ray Train with its checkpoints and export in the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm import storage
from llm.compress import tokens as token_source
from llm.compress import variants as build
from llm.compress.choose import choose, write_chosen
from llm.compress.compare import compare, write_eval
from llm.compress.distill import DistillJob, distill
from llm.compress.tokens import Tokens
from llm.config import ModelConfig, PipelineConfig
from llm.errors import ConfigError, StageInputError
from llm.eval import format_table
from llm.manifest import read_manifest
from llm.models.load import chosen_model_dir
from llm.stage import Stage, StageModel, StageResult, committed_folder, execute

WORK = "_work"
MLFLOW_MODEL = Path(__file__).with_name("mlflow_model.py")
"""The MLflow "models from code" file that opens a variant (`llm.compress.mlflow_model`)."""


@dataclass(frozen=True)
class Original:
    """The model compressed: a local copy to build from, where workers on any node read it, its stage."""

    local: Path
    """On this machine (a checked cache copy when its stage folder is in an object store)."""
    uri: str
    """Where workers read it and what `chosen.json` names: the same folder on a disk, or its store URI."""
    stage: str | None
    """The stage it comes from (`finetune`, `pretrain`), None for `compress.base`."""


def base_model(cfg: PipelineConfig) -> Original:
    """The model to compress: `compress.base`, else finetune's, else pretrain's."""
    if cfg.compress.base:
        path = Path(cfg.compress.base).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError(f"metadata.llm.compress.base: {path} is not a Hugging Face model directory "
                              "(no config.json)")
        return Original(path, str(path), None)
    for stage in ("finetune", "pretrain"):
        manifest = read_manifest(cfg.stage_dir(stage))
        if manifest is not None and "model/config.json" in manifest.files:
            folder = committed_folder(cfg.stage_dir(stage), manifest)
            return Original(folder.fetch("model"), folder.path("model"), stage)
    raise StageInputError(f"{cfg.stage_dir('')}: no committed finetune or pretrain model to compress; "
                          "run `llmray pretrain` (or finetune) first, or set compress.base=<model directory>")


def _done_before(folder: storage.Folder, rel: str) -> bool:
    """Whether a variant was finished and checked by an earlier, interrupted run (its `.done` is there); from
    a store it is copied back into the (fresh) staging folder, as the variants built from it and the table
    read it there."""
    if folder.size(rel, build.DONE) is None:
        return False
    folder.pull(rel)
    return True


def _publish(folder: storage.Folder, rel: str) -> None:
    """Mark a checked variant done: its files published first (uploaded with a store), its `.done` last."""
    folder.publish(rel)
    storage.write_bytes(folder.path(rel, build.DONE), b"")


def _ordered(names: list[str]) -> list[str]:
    """The variants to build, each after the one it is built from (added when not listed)."""
    out: list[str] = []

    def add(name: str) -> None:
        src = build.SOURCE[name]
        if src is not None:
            add(src)
        if name not in out:
            out.append(name)

    for name in names:
        add(name)
    return out


@dataclass(frozen=True)
class Sources:
    """What the variants are built from: the original, the tokens' folder, the calibration tokens."""

    original: Original
    tokens: Tokens
    calib: Any
    """`compress.prune.calib_rows` rows of tokens (`llm.compress.tokens.calibration_rows`)."""


def _build(cfg: PipelineConfig, folder: storage.Folder, name: str, rels: dict[str, str], src: Sources) -> None:
    """Build variant `name` into `folder.local/<rels[name]>` from the original or the variant it comes from.
    The pruned student of distillation is read by workers on any node from where it was published."""
    comp = cfg.compress
    parent = build.SOURCE[name]
    source = src.original.local if parent is None else folder.local / rels[parent]
    target = folder.local / rels[name]
    print(f"compress: building {name} from {source}", flush=True)
    if name in ("int8", "pruned-distilled-int8"):
        build.build_int8(source, target, src.calib, comp.quantize.embeddings, comp.device, comp.quantize.gpu_config)
    elif name == "pruned":
        build.build_pruned(source, target, src.calib, comp.prune.mlp_ratio, comp.prune.head_ratio,
                           comp.prune.multiple_of)
    else:
        student = comp.distill.student if parent is None else ModelConfig(path=folder.path(rels[parent]))
        assert student is not None  # the config requires distill.student for student-distilled
        rows, sft = token_source.distill_rows(cfg, src.tokens, src.original.stage == "finetune")
        job = DistillJob(work=folder.child(WORK, f"{name}-train"), data=rows, teacher=src.original.local,
                         teacher_uri=src.original.uri, student=student, sft=sft)
        build.place_export(distill(cfg, job), target)


def make_variants(cfg: PipelineConfig, folder: storage.Folder, original: Original,
                  tokens: Tokens) -> dict[str, Path]:
    """Build every listed variant (and what it is built from) that is not done yet; name -> local folder.
    `tokens` says where the shards are read from (a store included)."""
    comp = cfg.compress
    calib = token_source.calibration_rows(tokens, comp.prune.calib_rows, cfg.data.seq_len, original.local)
    src = Sources(original, tokens, calib)
    rels = {name: name if name in comp.variants else f"{WORK}/{name}" for name in _ordered(list(comp.variants))}
    for name, rel in rels.items():
        if _done_before(folder, rel):
            print(f"compress: {name}: done earlier, kept", flush=True)
            continue
        _build(cfg, folder, name, rels, src)
        _publish(folder, rel)
    return {name: folder.local / rels[name] for name in comp.variants}


def _summary(rows: list[dict[str, Any]], choice: dict[str, Any]) -> dict[str, Any]:
    figures = ("params", "disk_mb", "val_ppl", "sft_ppl", "rouge_l", "tok_s_b1", "tok_s_b8", "tok_s_serve")
    return {"chosen": choice["variant"], "reason": choice["reason"],
            "models": {r["model"]: {k: r[k] for k in figures} for r in rows}}


def run(cfg: PipelineConfig, force: bool = False) -> StageResult:
    """Compress stage: skip if done; else build the variants, evaluate them with the original, choose one.

    Args:
        cfg: the pipeline config.
        force: rebuild everything (the committed folder is kept aside).
    """
    original = base_model(cfg)
    planned = token_source.plan(cfg, original.local, original.stage)
    inputs = tuple(dict.fromkeys((*planned.stages, *((original.stage,) if original.stage else ()))))

    def body(folder: storage.Folder) -> dict[str, Any]:
        tokens = token_source.render(cfg, planned, folder.child(WORK), original.local, original.stage == "finetune")
        print(f"compress: {tokens.describe()}", flush=True)
        made = make_variants(cfg, folder, original, tokens)
        print("compress: evaluating the original and every variant on the same tokens and prompts", flush=True)
        rows = compare(cfg, {"original": original.local, **made}, tokens, folder.local / "lm_eval")
        write_eval(folder.local, rows)
        choice = choose(rows, cfg.compress.choose, cfg.compress.eval.serve_batch)
        write_chosen(folder.local, choice, original.uri, folder.uri)
        print(format_table(rows), flush=True)
        print(f"compress: chosen {choice['variant']}: {choice['reason']}\n  table: {folder.path('eval.json')}"
              f"\n  chosen: {folder.path('chosen.json')}", flush=True)
        return _summary(rows, choice)

    return execute(cfg, STAGE, body, inputs=inputs, force=force)


def progress(folder: str) -> str:
    """For `llmray status`: variants finished and checked (`<variant>/.done`; `_work/` is not listed)."""
    done = sorted(rel.split("/")[0] for rel in storage.list_files(folder)
                  if rel.count("/") == 1 and rel.endswith(f"/{build.DONE}"))
    if not done:
        return "no variant done yet; a rerun builds every variant"
    return f"variants done: {', '.join(done)}; a rerun keeps them"


def chosen_model(cfg: PipelineConfig) -> StageModel:
    """For tracking: the committed chosen variant (`chosen.json`), opened by `llm.compress.mlflow_model`, whose
    answers are as long as the eval table's (`compress.eval.max_new_tokens`)."""
    return StageModel(chosen_model_dir(cfg), MLFLOW_MODEL, {"max_new_tokens": cfg.compress.eval.max_new_tokens})


STAGE = Stage("compress", "quantize, prune, distil, evaluate, choose", run, sections=("compress",),
              inputs=("data", "pretrain", "finetune"), resumable=True,
              progress=progress, model=chosen_model)
