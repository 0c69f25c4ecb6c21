"""The compress stage: variants of the fine-tuned (else pretrained) model, one eval table, one choice.

Writes under `<storage>/<run>/compress/`: `<variant>/` for each of `compress.variants` (each opens with
`llm.compress.load.load_model`), `_work/` (distillation runs with their checkpoints, and intermediate
models a variant is built from but that is not listed itself), `eval.json` (the original and every variant
on the same tokens and prompts), `chosen.json` (the variant the rule picks, read by the serve stage), then
the manifest. A rerun after an interruption keeps the variants already finished and checked.

With `storage` in an object store the original comes from a checked cache copy of its committed folder and
the data stage's shards are read from the store (only the val splits are copied, for the table); int8 and
pruned variants are built here and each is uploaded as soon as it is checked (its `.done` object last, so an
interrupted stage keeps it); distillation runs on Ray Train with its checkpoints and export in the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm import storage
from llm.compress import variants as build
from llm.config import PipelineConfig
from llm.errors import ConfigError, StageInputError
from llm.manifest import read_manifest
from llm.stage import Stage, StageResult, execute, input_dir, input_uri, local_dir
from llm.stage import target as stage_target

WORK = "_work"


def base_model(cfg: PipelineConfig) -> tuple[Path, str | None]:
    """(the model to compress, the stage it comes from): `compress.base`, else finetune's, else pretrain's."""
    if cfg.compress.base:
        path = Path(cfg.compress.base).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError(f"metadata.llm.compress.base: {path} is not a Hugging Face model directory "
                              "(no config.json)")
        return path, None
    for stage in ("finetune", "pretrain"):
        uri = cfg.stage_dir(stage)
        if storage.is_remote(uri):
            manifest = read_manifest(uri)
            if manifest is not None and "model/config.json" in manifest.files:
                return input_dir(cfg, stage, parts=("model",)) / "model", stage  # a checked cache copy
            continue
        folder = local_dir(uri)
        if read_manifest(folder) is not None and (folder / "model" / "config.json").exists():
            return folder / "model", stage
    raise StageInputError(f"{cfg.stage_dir('')}: no committed finetune or pretrain model to compress; "
                          "run `llmray pretrain` (or finetune) first, or set compress.base=<model directory>")


def _done_before(folder: Path, where: Path) -> bool:
    """Whether a variant was finished and checked by an earlier, interrupted run; from a store it is copied
    back into the (fresh) staging folder, as the variants built from it and the table read it there."""
    store = stage_target(folder)
    if not storage.is_remote(store):
        return build.is_done(where)
    uri = storage.join(store, where.relative_to(folder).as_posix())
    if storage.size(storage.join(uri, build.DONE)) is None:
        return False
    storage.download(uri, where)
    return True


def _publish(folder: Path, where: Path) -> None:
    """Mark a checked variant done; in a store, upload it first and write its `.done` object last."""
    store = stage_target(folder)
    if storage.is_remote(store):
        uri = storage.join(store, where.relative_to(folder).as_posix())
        storage.upload(where, uri)
        storage.write_bytes(storage.join(uri, build.DONE), b"")
    build.mark_done(where)


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


def make_variants(cfg: PipelineConfig, folder: Path, base: Path, from_stage: str | None,
                  data: Path | str) -> dict[str, Path]:
    """Build every listed variant (and what it is built from) that is not done yet; name -> folder.
    `data` is the data stage's folder (a store URI included: shards are read from there)."""
    from llm.compress.distill import distill, use_sft

    comp = cfg.compress
    store = stage_target(folder)
    remote = storage.is_remote(store)
    teacher_uri = storage.join(cfg.stage_dir(from_stage), "model") if remote and from_stage else None
    calib = build.calibration_rows(data, comp.prune.calib_rows)
    where: dict[str, Path] = {}
    for name in _ordered(list(comp.variants)):
        target = folder / name if name in comp.variants else folder / WORK / name
        where[name] = target
        if _done_before(folder, target):
            print(f"compress: {name}: done earlier, kept", flush=True)
            continue
        src = base if build.SOURCE[name] is None else where[str(build.SOURCE[name])]
        print(f"compress: building {name} from {src}", flush=True)
        if name in ("int8", "pruned-distilled-int8"):
            build.build_int8(src, target, calib, comp.quantize.embeddings, comp.device, comp.quantize.gpu_config)
        elif name == "pruned":
            build.build_pruned(src, target, calib, comp.prune.mlp_ratio, comp.prune.head_ratio,
                               comp.prune.multiple_of)
        else:
            if name != "pruned-distilled":
                student = comp.distill.student.model_dump(mode="json")  # type: ignore[union-attr]  # checked
            else:  # workers on any node read the pruned model from the store, where it was published
                student = {"path": storage.join(store, src.relative_to(folder).as_posix()) if remote else str(src)}
            work = folder / WORK / f"{name}-train"
            exported = distill(cfg, work, data, base, student, use_sft(cfg, data, from_stage == "finetune"),
                               store=storage.join(store, WORK, f"{name}-train") if remote else None,
                               teacher_uri=teacher_uri)
            build.place_export(exported, target)
        _publish(folder, target)
    return {name: where[name] for name in comp.variants}


def _summary(rows: list[dict[str, Any]], choice: dict[str, Any]) -> dict[str, Any]:
    figures = ("params", "disk_mb", "val_ppl", "sft_ppl", "rouge_l", "tok_s_b1", "tok_s_b8")
    return {"chosen": choice["variant"], "reason": choice["reason"],
            "models": {r["model"]: {k: r[k] for k in figures} for r in rows}}


def run(cfg: PipelineConfig, force: bool = False) -> StageResult:
    """Compress stage: skip if done; else build the variants, evaluate them with the original, choose one.

    Args:
        cfg: the pipeline config.
        force: rebuild everything (the committed folder is kept aside).
    """
    from llm.compress.choose import choose, write_chosen
    from llm.compress.compare import compare, write_eval
    from llm.eval import format_table

    base, from_stage = base_model(cfg)
    inputs = ("data",) + ((from_stage,) if from_stage else ())
    remote = storage.is_remote(cfg.stage_dir("compress"))
    original = storage.join(cfg.stage_dir(from_stage), "model") if remote and from_stage else base

    def body(folder: Path) -> dict[str, Any]:
        made = make_variants(cfg, folder, base, from_stage, input_uri(cfg, "data"))
        print("compress: evaluating the original and every variant on the same tokens and prompts", flush=True)
        rows = compare(cfg, {"original": base, **made}, input_dir(cfg, "data", parts=("packed/val", "sft/val")))
        write_eval(folder, rows)
        choice = choose(rows, cfg.compress.choose)
        write_chosen(folder, choice, original)
        print(format_table(rows), flush=True)
        out = stage_target(folder)
        print(f"compress: chosen {choice['variant']}: {choice['reason']}\n  table: {storage.join(out, 'eval.json')}"
              f"\n  chosen: {storage.join(out, 'chosen.json')}", flush=True)
        return _summary(rows, choice)

    return execute(cfg, STAGE, body, inputs=inputs, force=force)


def progress(folder: str) -> str:
    """For `llmray status`: variants finished and checked (`<variant>/.done`; `_work/` is not listed)."""
    done = sorted(rel.split("/")[0] for rel in storage.list_files(folder)
                  if rel.count("/") == 1 and rel.endswith(f"/{build.DONE}"))
    if not done:
        return "no variant done yet; a rerun builds every variant"
    return f"variants done: {', '.join(done)}; a rerun keeps them"


STAGE = Stage("compress", "quantize, prune, distil, evaluate, choose", run, sections=("compress",),
              inputs=("data", "pretrain", "finetune"), resumable=True,
              progress=progress)
