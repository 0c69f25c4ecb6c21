"""The data stage: read + clean, dedup, tokenizer, tokenize + pack, SFT; committed with the manifest.

Every heavy step is a Ray task over *units* (contiguous runs of files in the resolved order) so that output
file names and contents depend only on the inputs, never on scheduling. Nothing per document comes back to
the driver: per-unit counts, the files that failed to read (with their errors) and folder names. Dedup
shuffles through files (`llm.data.dedup`), the tokenizer trains in one task on a streamed sample, and each
task that writes a stage file records its checksum beside it (`llm.data.checksums`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from llm import storage
from llm.config import PipelineConfig
from llm.data import clean, dedup, pack, report, sft, sources
from llm.data.tokenizer import copy_tokenizer, tokenizer_unit
from llm.stage import Stage, StageResult, execute, target


def units(files: list[sources.SourceFile], n_units: int) -> list[list[sources.SourceFile]]:
    """Contiguous, near-equal runs of files; at most `n_units` of them."""
    n = max(1, min(n_units, len(files)))
    bounds = np.linspace(0, len(files), n + 1).round().astype(int)
    return [files[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _unit_items(groups: list[list[sources.SourceFile]]) -> list[dict[str, Any]]:
    return [{"unit": i, "files": json.dumps([f.__dict__ for f in g])} for i, g in enumerate(groups)]


def _setup_ray(cfg: PipelineConfig) -> int:
    import ray
    from ray.data import DataContext

    from llm.raycluster import connect

    connect(cfg)
    ctx = DataContext.get_current()
    # Bad records and bad files are caught per record and per file and counted; an errored block can only
    # be a bug, and tolerating it would silently lose every document of that block. Hence 0 by default.
    ctx.max_errored_blocks = cfg.data.max_errored_blocks
    ctx.execution_options.preserve_order = True  # results in unit order: stats and logs read the same
    return cfg.data.parallelism or max(1, int(ray.cluster_resources().get("CPU", 1)))


def map_units(items: list[dict[str, Any]], fn: Any, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Run `fn` on every work unit (one row each) as Ray Data tasks of one CPU; returns their result rows.

    A unit job is a single operator, so Ray Data's per-operator resource reservation has nothing to
    protect here, while its budget starts at zero CPUs and grows only as the first tasks report: with
    as many units as CPUs it ran them one after another (measured: 2 units on 2 CPUs took twice as long).
    It is turned off for these jobs only; multi-operator pipelines (dedup, training ingest) keep it.
    """
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    reservation = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # Object-store storage: each task writes on its own node and uploads (`llm.storage.remote_task`).
        task = storage.remote_task(fn, local_args=("tokenizer_dir",))
        out = ds.map_batches(task, batch_size=1, fn_kwargs=kwargs, num_cpus=1, batch_format="pandas")
        return out.take_all()
    finally:
        ctx.op_resource_reservation_enabled = reservation


def _clean_counts(cleaned: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int], int]:
    """Counts per drop reason, PII replacements per kind and invalid UTF-8 replacements: the units' sums."""
    reasons: dict[str, int] = {}
    pii: dict[str, int] = {}
    utf8 = 0
    for r in cleaned:
        c = json.loads(r["counts"])
        for k, v in c["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
        for k, v in c["pii"].items():
            pii[k] = pii.get(k, 0) + v
        utf8 += c["utf8"]
    return reasons, pii, utf8


def _body(cfg: PipelineConfig, folder: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    dc = cfg.data
    files = sources.resolve(dc.sources)  # before any Ray work: a bad source fails fast
    sft_files = sources.resolve(dc.sft.sources) if dc.sft.sources else []
    cpus = _setup_ray(cfg)
    # Tasks write the stage's files (and their checksum sidecars) under `store`: this folder, or the stage's URI
    # in an object store. The driver gets counts and paths back, never a row.
    store = target(folder)
    groups = units(files, max(4 * cpus, len(files) // 64))
    cleaned = map_units(_unit_items(groups), clean.clean_unit, {"cfg": dc, "out_dir": store})
    cleaned = sorted(cleaned, key=lambda r: r["unit"])
    paths = [r["path"] for r in cleaned]
    read_errors = [e for r in cleaned for e in json.loads(r["read_errors"])]
    reasons, pii, utf8 = _clean_counts(cleaned)
    t_dedup = time.perf_counter()
    marks, dedup_stats = dedup.run(paths, storage.join(store, "_work", "dedup"), documents=sum(reasons.values()),
                                   exact=dc.dedup.exact, fuzzy=dc.dedup.fuzzy, cpus=cpus)
    dedup_seconds = round(time.perf_counter() - t_dedup, 2)

    tok_dir = folder / "tokenizer"
    if dc.tokenizer.path:  # a folder on the driver's machine: copied here, uploaded with the driver's files
        vocab_size = len(copy_tokenizer(dc.tokenizer.path, tok_dir))
        tok_src = str(tok_dir)
        if storage.is_remote(store):  # the pack and SFT tasks read the tokenizer from the store, on any node
            tok_src = storage.join(store, "tokenizer")
            storage.upload(tok_dir, tok_src)
    else:  # trained in one task on a sample streamed from the cleaned units
        t = dc.tokenizer
        vocab_size = int(map_units([{"unit": 0}], tokenizer_unit, {
            "paths": paths, "marks": marks, "sample_bytes": t.sample_bytes, "vocab_size": t.vocab_size,
            "min_frequency": t.min_frequency, "out_dir": store})[0]["vocab_size"])
        tok_src = storage.join(store, "tokenizer")

    packed = map_units([{"unit": i, "paths": "\n".join(g)} for i, g in enumerate(_path_groups(paths, cpus))],
                        pack.pack_unit,
                        {"tokenizer_dir": tok_src, "out_dir": store, "seq_len": dc.seq_len,
                         "val_fraction": dc.val_fraction, "rows_per_shard": dc.rows_per_shard, "marks": marks})
    sft_counts: dict[str, int] = {}
    if sft_files:
        items = _unit_items(units(sft_files, max(cpus, len(sft_files) // 64)))
        rendered = map_units(items, sft.sft_unit, {"tokenizer_dir": tok_src, "out_dir": store,
                                                   "max_len": dc.sft.max_len, "val_fraction": dc.sft.val_fraction})
        for r in sorted(rendered, key=lambda r: r["unit"]):
            for k, v in json.loads(r["counts"]).items():
                sft_counts[k] = sft_counts.get(k, 0) + v
            read_errors += json.loads(r["read_errors"])
    storage.remove_tree(storage.join(store, "_work"))

    total = {k: int(sum(r[k] for r in packed)) for k in packed[0] if k != "unit"}
    tokens = total["tokens_train"] + total["tokens_val"]
    metrics = {
        "documents_in": sum(reasons.values()), "documents_kept_after_filters": reasons.get("kept", 0),
        "documents_out": total["docs_train"] + total["docs_val"],
        "dropped": {k: v for k, v in sorted(reasons.items()) if k != "kept"}, "read_errors": read_errors,
        "pii_redacted": pii, "utf8_replacements": utf8, **dedup_stats,
        "dedup_seconds": dedup_seconds,
        "tokens_train": total["tokens_train"], "tokens_val": total["tokens_val"],
        "sequences_train": total["rows_train"], "sequences_val": total["rows_val"],
        "remainder_tokens_dropped": total["remainder_tokens"],
        "bytes_per_token": round(total["text_bytes"] / max(tokens, 1), 4), "shards": total["shards"],
        "vocab_size": vocab_size, "seq_len": dc.seq_len, "sft": sft_counts,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    (folder / "stats.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _path_groups(paths: list[str], cpus: int) -> list[list[str]]:
    """Pack units: contiguous runs of cleaned files, at least one per CPU when there are enough files."""
    n = max(1, min(len(paths), cpus))
    bounds = np.linspace(0, len(paths), n + 1).round().astype(int)
    return [paths[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def run(cfg: PipelineConfig, force: bool = False) -> StageResult:
    """Run the data stage (skipped when its manifest matches `cfg.data`), then print its summary."""
    sources.resolve(cfg.data.sources)  # a source that matches nothing fails here, before the old output is cleared
    if cfg.data.sft.sources:
        sources.resolve(cfg.data.sft.sources)
    result = execute(cfg, STAGE, lambda folder: _body(cfg, folder), force=force)
    if not result.skipped:
        print(report.summary(result.metrics, result.path))
    return result


STAGE = Stage("data", "read, clean, dedup, train a tokenizer, pack (Ray Data)", run, sections=("data",))
