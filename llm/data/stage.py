"""The data stage: read + clean, dedup, tokenizer, tokenize + pack, SFT; committed with the manifest.

Every heavy step is a Ray Data operator over *units* (contiguous runs of files in the resolved order) so
that output file names and contents depend only on the inputs, never on scheduling. Only small things come
back to the driver: per-unit counts, the files that failed to read (with their errors), doc ids and content
hashes for exact dedup, verified duplicate pairs for clustering, and a bounded text sample for tokenizer
training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm import storage
from llm.config import PipelineConfig
from llm.data import clean, dedup, pack, report, sft, sources
from llm.data.tokenizer import copy_tokenizer, train_tokenizer
from llm.stage import StageResult, execute, target


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


def _clean_stats(paths: list[str]) -> tuple[dict[str, int], dict[str, int], int, dict[str, Any]]:
    """Counts per drop reason, PII replacements per kind, invalid UTF-8 replacements, and the kept index."""
    reasons: dict[str, int] = {}
    pii: dict[str, int] = {}
    utf8 = 0
    ids, hashes = [], []
    for path in paths:
        cols = ["reason", "utf8_errors", "doc_id", "content_hash"]
        t = pq.read_table(path, columns=cols + [c for c in pq.read_schema(path).names if c.startswith("pii_")])
        for value in t.column("reason").to_pylist():
            reasons[value or "kept"] = reasons.get(value or "kept", 0) + 1
        utf8 += int(pc.sum(t.column("utf8_errors")).as_py() or 0)
        for name in t.column_names:
            if name.startswith("pii_"):
                pii[name[4:]] = pii.get(name[4:], 0) + int(pc.sum(t.column(name)).as_py() or 0)
        kept = pc.equal(t.column("reason"), "")
        ids.append(t.column("doc_id").filter(kept).to_numpy())
        hashes.append(t.column("content_hash").filter(kept).to_numpy())
    index = {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int64),
             "hashes": np.concatenate(hashes) if hashes else np.zeros(0, np.int64)}
    return reasons, pii, utf8, index


def _write_dropped(paths: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        t = pq.read_table(path, columns=["text", "source", "reason"])
        t = t.filter(pc.not_equal(t.column("reason"), ""))
        if t.num_rows:
            pq.write_table(t, folder / Path(path).name)


def _sample(paths: list[str], drop: np.ndarray, limit: int):  # noqa: ANN202 - a generator of str
    """Kept, non-duplicate texts in file order until `limit` bytes: the tokenizer's training sample."""
    seen = 0
    for path in paths:
        for rb in pq.ParquetFile(path).iter_batches(columns=["text", "reason", "doc_id"]):
            keep = (rb.column("reason").to_numpy(zero_copy_only=False) == "") & ~np.isin(rb.column("doc_id"), drop)
            for text, k in zip(rb.column("text").to_pylist(), keep, strict=True):
                if k:
                    yield text
                    seen += len(text.encode("utf-8"))
                    if seen >= limit:
                        return


def _dedup(cfg: PipelineConfig, paths: list[str], index: dict[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
    import ray

    d = cfg.data.dedup
    exact = dedup.exact_duplicates(index["ids"], index["hashes"]) if d.exact else np.zeros(0, np.int64)
    stats = {"exact_duplicates": len(exact), "fuzzy_duplicates": 0, "fuzzy_clusters": 0, "fuzzy_pairs": 0}
    drop = exact
    if d.fuzzy.enabled and len(index["ids"]) - len(exact) > 1:
        ds = ray.data.read_parquet(paths, columns=["doc_id", "reason", "sig"])
        ds = ds.map_batches(dedup.kept_rows, fn_kwargs={"drop": exact}, batch_format="numpy")  # type: ignore[arg-type]
        fuzzy, clusters, pairs = dedup.fuzzy_duplicates(ds, threshold=d.fuzzy.threshold, num_perm=d.fuzzy.num_perm)
        stats.update(fuzzy_duplicates=len(fuzzy), fuzzy_clusters=clusters, fuzzy_pairs=pairs)
        drop = np.union1d(exact, fuzzy)
    return drop, stats


def _body(cfg: PipelineConfig, folder: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    dc = cfg.data
    files = sources.resolve(dc.sources)  # before any Ray work: a bad source fails fast
    sft_files = sources.resolve(dc.sft.sources) if dc.sft.sources else []
    cpus = _setup_ray(cfg)
    store = target(folder)  # where tasks write: this folder, or the stage's URI in an object store
    work = storage.join(store, "_work", "clean")
    if not storage.is_remote(work):
        Path(work).mkdir(parents=True, exist_ok=True)

    groups = units(files, max(4 * cpus, len(files) // 64))
    cleaned = map_units(_unit_items(groups), clean.clean_unit, {"cfg": dc, "out_dir": work})
    cleaned = sorted(cleaned, key=lambda r: r["unit"])
    paths = [r["path"] for r in cleaned]
    read_errors = [e for r in cleaned for e in json.loads(r["read_errors"])]
    reasons, pii, utf8, index = _clean_stats(paths)
    if dc.keep_dropped:
        _write_dropped(paths, folder / "dropped")
    drop, dedup_stats = _dedup(cfg, paths, index)

    tok_dir = folder / "tokenizer"
    if dc.tokenizer.path:
        tok = copy_tokenizer(dc.tokenizer.path, tok_dir)
    else:
        tok = train_tokenizer(_sample(paths, drop, dc.tokenizer.sample_bytes), tok_dir,
                              vocab_size=dc.tokenizer.vocab_size, min_frequency=dc.tokenizer.min_frequency)

    import ray

    tok_src = str(tok_dir)
    if storage.is_remote(store):  # the pack and SFT tasks read the tokenizer from the store, on any node
        tok_src = storage.join(store, "tokenizer")
        storage.upload(tok_dir, tok_src)
    drop_ref = ray.put(drop)
    packed = map_units([{"unit": i, "paths": "\n".join(g)} for i, g in enumerate(_path_groups(paths, cpus))],
                        pack.pack_unit,
                        {"tokenizer_dir": tok_src, "out_dir": storage.join(store, "packed"), "seq_len": dc.seq_len,
                         "val_fraction": dc.val_fraction, "rows_per_shard": dc.rows_per_shard, "drop_ids": drop_ref})
    sft_counts: dict[str, int] = {}
    if sft_files:
        items = _unit_items(units(sft_files, max(cpus, len(sft_files) // 64)))
        rendered = map_units(items, sft.sft_unit, {"tokenizer_dir": tok_src, "out_dir": storage.join(store, "sft"),
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
        "tokens_train": total["tokens_train"], "tokens_val": total["tokens_val"],
        "sequences_train": total["rows_train"], "sequences_val": total["rows_val"],
        "remainder_tokens_dropped": total["remainder_tokens"],
        "bytes_per_token": round(total["text_bytes"] / max(tokens, 1), 4), "shards": total["shards"],
        "vocab_size": len(tok), "seq_len": dc.seq_len, "sft": sft_counts,
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
    result = execute(cfg, "data", lambda folder: _body(cfg, folder), sections=("data",), force=force)
    if not result.skipped:
        print(report.summary(result.metrics, result.path))
    return result
