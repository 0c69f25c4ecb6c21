"""The compress stage: variants of the fine-tuned (else pretrained) model, one eval table, one choice.

Writes under `<storage>/<run>/compress/`: `<variant>/` for each of `compress.variants` (each opens with
`llm.compress.load.load_model`), `_work/` (distillation runs with their checkpoints, and intermediate
models a variant is built from but that is not listed itself), `eval.json` (the original and every variant
on the same tokens and prompts), `chosen.json` (the variant the rule picks, read by the serve stage), then
the manifest. A rerun after an interruption keeps the variants already finished and checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.compress import variants as build
from llm.config import PipelineConfig
from llm.errors import ConfigError, StageInputError
from llm.manifest import read_manifest
from llm.stage import StageResult, execute, input_dir, local_dir

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
        folder = local_dir(cfg.stage_dir(stage))
        if read_manifest(folder) is not None and (folder / "model" / "config.json").exists():
            return folder / "model", stage
    raise StageInputError(f"{local_dir(cfg.stage_dir(''))}: no committed finetune or pretrain model to compress; "
                          "run `llmray pretrain` (or finetune) first, or set compress.base=<model directory>")


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


def make_variants(cfg: PipelineConfig, folder: Path, base: Path, from_stage: str | None, data: Path) -> dict[str, Path]:
    """Build every listed variant (and what it is built from) that is not done yet; name -> folder."""
    from llm.compress.distill import distill, use_sft

    comp = cfg.compress
    calib = build.calibration_rows(data, comp.prune.calib_rows)
    where: dict[str, Path] = {}
    for name in _ordered(list(comp.variants)):
        target = folder / name if name in comp.variants else folder / WORK / name
        where[name] = target
        if build.is_done(target):
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
            student = {"path": str(src)} if name == "pruned-distilled" else \
                comp.distill.student.model_dump(mode="json")  # type: ignore[union-attr]  # checked by the config
            work = folder / WORK / f"{name}-train"
            exported = distill(cfg, work, data, base, student, use_sft(cfg, data, from_stage == "finetune"))
            build.place_export(exported, target)
        build.mark_done(target)
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

    def body(folder: Path) -> dict[str, Any]:
        data = input_dir(cfg, "data")
        made = make_variants(cfg, folder, base, from_stage, data)
        print("compress: evaluating the original and every variant on the same tokens and prompts", flush=True)
        rows = compare(cfg, {"original": base, **made}, data)
        write_eval(folder, rows)
        choice = choose(rows, cfg.compress.choose)
        write_chosen(folder, choice, base)
        print(format_table(rows), flush=True)
        print(f"compress: chosen {choice['variant']}: {choice['reason']}\n  table: {folder / 'eval.json'}\n"
              f"  chosen: {folder / 'chosen.json'}", flush=True)
        return _summary(rows, choice)

    return execute(cfg, "compress", body, sections=("compress",), inputs=inputs, force=force, keep_partial=True)
