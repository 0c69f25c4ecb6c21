"""The data stage: read + clean, dedup, tokenizer, tokenize + pack, SFT; committed with the manifest.

Every heavy step is a Ray task over *units* (contiguous runs of files in the resolved order) so that output
file names and contents depend only on the inputs, never on scheduling. Nothing per document comes back to
the driver: per-unit counts, the files that failed to read (with their errors) and folder names. Dedup
shuffles through files (`llm.data.dedup`), the tokenizer trains in one task on a streamed sample, and each
task that writes a stage file records its checksum beside it (`llm.data.checksums`). A corpus that leaves
nothing to train on (no document kept, no full training sequence, no SFT example) is a one-line `DataError`
naming the drop counts, and nothing is committed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from llm import storage
from llm.config import DataConfig, PipelineConfig
from llm.data import clean, dedup, pack, report, sft, sources
from llm.data.tokenizer import copy_tokenizer, tokenizer_unit
from llm.errors import DataError
from llm.raycluster import connect
from llm.stage import Stage, StageResult, execute


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
        task = storage.remote_task(fn)
        out = ds.map_batches(task, batch_size=1, fn_kwargs=kwargs, num_cpus=1, batch_format="pandas")
        return out.take_all()
    finally:
        ctx.op_resource_reservation_enabled = reservation


@dataclass
class Cleaned:
    """What the clean step made: the cleaned units' paths (in unit order) and the counts they returned."""

    paths: list[str]
    read_errors: list[dict[str, str]]
    reasons: dict[str, int]
    """Documents per drop reason (`kept` for the rest)."""
    first: dict[str, str]
    """Per drop reason, the source (`file:line`) of its first row in corpus order."""
    pii: dict[str, int]
    utf8: int
    normalized: int
    """Documents that normalization changed."""

    @property
    def documents(self) -> int:
        return sum(self.reasons.values())

    def funnel(self) -> str:
        """`N documents read: kept K, <reason> n, ...` (largest first): the counts an error names."""
        counts = ", ".join(f"{k} {v:,}" for k, v in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"{self.documents:,} documents read: {counts or 'none'}"


def _clean_counts(cleaned: list[dict[str, Any]]) -> Cleaned:
    """The units' counts summed: per drop reason (and its first source), PII replacements per kind, invalid
    UTF-8 replacements, documents normalization changed."""
    out = Cleaned([r["path"] for r in cleaned], [e for r in cleaned for e in json.loads(r["read_errors"])],
                  {}, {}, {}, 0, 0)
    for r in cleaned:
        c = json.loads(r["counts"])
        for k, v in c["reasons"].items():
            out.reasons[k] = out.reasons.get(k, 0) + v
        for k, v in c["first"].items():
            out.first.setdefault(k, v)
        for k, v in c["pii"].items():
            out.pii[k] = out.pii.get(k, 0) + v
        out.utf8 += c["utf8"]
        out.normalized += c["normalized"]
    return out


def _clean(dc: DataConfig, files: list[sources.SourceFile], cpus: int, store: str) -> Cleaned:
    """Read and clean every unit into `<store>/_work/clean/`; the units' paths and counts."""
    groups = units(files, max(4 * cpus, len(files) // 64))
    rows = sorted(map_units(_unit_items(groups), clean.clean_unit, {"cfg": dc, "out_dir": store}),
                  key=lambda r: r["unit"])
    return _clean_counts(rows)


def _tokenizer(dc: DataConfig, folder: storage.Folder, paths: list[str], marks: list[str]) -> tuple[int, str]:
    """The stage's tokenizer in `<folder>/tokenizer/`: (its vocab size, the URI the pack and SFT tasks read it
    from, on any node)."""
    if dc.tokenizer.path:  # a folder on the driver's machine: copied here, published for the tasks
        vocab_size = len(copy_tokenizer(dc.tokenizer.path, folder.local / "tokenizer"))
        return vocab_size, folder.publish("tokenizer")
    t = dc.tokenizer  # trained in one task on a sample streamed from the cleaned units
    vocab_size = int(map_units([{"unit": 0}], tokenizer_unit, {
        "paths": paths, "marks": marks, "sample_bytes": t.sample_bytes, "vocab_size": t.vocab_size,
        "min_frequency": t.min_frequency, "out_dir": folder.uri})[0]["vocab_size"])
    return vocab_size, folder.path("tokenizer")


class Rendered(NamedTuple):
    """What the SFT step made: its counts summed over the units, its files that failed to read, and its first
    dropped records by name (`{"record": "file:line", "reason", "detail"}`)."""

    counts: dict[str, int]
    read_errors: list[dict[str, str]]
    dropped: list[dict[str, str]]


def _sft(dc: DataConfig, sft_files: list[sources.SourceFile], cpus: int, tok_src: str, store: str) -> Rendered:
    """Render the SFT sources into `<store>/sft/` with the tokenizer at `tok_src`."""
    counts: dict[str, int] = {}
    errors: list[dict[str, str]] = []
    named: list[dict[str, str]] = []
    if not sft_files:
        return Rendered(counts, errors, named)
    items = _unit_items(units(sft_files, max(cpus, len(sft_files) // 64)))
    rendered = map_units(items, sft.sft_unit, {"tokenizer_dir": tok_src, "out_dir": store,
                                               "max_len": dc.sft.max_len, "val_fraction": dc.sft.val_fraction})
    for r in sorted(rendered, key=lambda r: r["unit"]):
        for k, v in json.loads(r["counts"]).items():
            counts[k] = counts.get(k, 0) + v
        errors += json.loads(r["read_errors"])
        named += json.loads(r["dropped"])[: max(0, sft.NAMED_DROPS - len(named))]
    return Rendered(counts, errors, named)


def _nothing_to_commit(folder: storage.Folder, message: str) -> DataError:
    """The one-line error of a corpus that leaves nothing to train on; the work files go, nothing is committed."""
    folder.remove("_work")
    return DataError(f"data: {message}; nothing committed")


def _body(cfg: PipelineConfig, folder: storage.Folder) -> dict[str, Any]:
    t0 = time.perf_counter()
    dc = cfg.data
    files = sources.resolve(dc.sources)  # before any Ray work: a bad source fails fast
    sft_files = sources.resolve(dc.sft.sources) if dc.sft.sources else []
    cpus = _setup_ray(cfg)
    # Tasks write the stage's files (and their checksum sidecars) under `folder.uri`, on whatever node they run;
    # the driver gets counts and paths back, never a row.
    cleaned = _clean(dc, files, cpus, folder.uri)
    if not cleaned.reasons.get("kept"):
        raise _nothing_to_commit(folder, f"no document passed reading and the filters ({cleaned.funnel()}); "
                                         "check data.sources, data.text_field and the filter settings")
    t_dedup = time.perf_counter()
    marks, counts = dedup.run(cleaned.paths, folder.path("_work", "dedup"), documents=cleaned.documents,
                              exact=dc.dedup.exact, fuzzy=dc.dedup.fuzzy, cpus=cpus)
    dedup_stats: dict[str, Any] = {**counts, "dedup_seconds": round(time.perf_counter() - t_dedup, 2)}
    vocab_size, tok_src = _tokenizer(dc, folder, cleaned.paths, marks)
    packed = map_units([{"unit": i, "paths": "\n".join(g)} for i, g in enumerate(_path_groups(cleaned.paths, cpus))],
                        pack.pack_unit,
                        {"tokenizer_dir": tok_src, "out_dir": folder.uri, "seq_len": dc.seq_len,
                         "val_fraction": dc.val_fraction, "rows_per_shard": dc.rows_per_shard, "marks": marks})
    if not sum(r["rows_train"] for r in packed):
        tokens = sum(r["tokens_train"] for r in packed)
        raise _nothing_to_commit(folder, f"the corpus packs into no training sequence ({tokens:,} training tokens, "
                                         f"data.seq_len={dc.seq_len}; {cleaned.funnel()})")
    rendered = _sft(dc, sft_files, cpus, tok_src, folder.uri)
    if sft_files and not rendered.counts.get("train"):
        first = "; ".join(f"{d['record']}: {d['reason']}" + (f" ({d['detail']})" if d["detail"] else "")
                          for d in rendered.dropped[:2])
        raise _nothing_to_commit(folder, f"data.sft.sources: no usable training example ({json.dumps(rendered.counts)}"
                                         + (f"; first dropped: {first}" if first else "") + ")")
    folder.remove("_work")
    metrics = _metrics(dc, cleaned, dedup_stats, packed, vocab_size, rendered)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 2)
    folder.write_text("stats.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _metrics(dc: DataConfig, cleaned: Cleaned, dedup_stats: dict[str, Any], packed: list[dict[str, Any]],
             vocab_size: int, rendered: Rendered) -> dict[str, Any]:
    """The stage's stats (`stats.json` and the manifest's metrics) from what its steps returned, in the order
    they have always had, but for `wall_seconds`, which the body adds last."""
    reasons = cleaned.reasons
    total = {k: int(sum(r[k] for r in packed)) for k in packed[0] if k != "unit"}
    tokens = total["tokens_train"] + total["tokens_val"]
    return {
        "documents_in": cleaned.documents, "documents_normalized": cleaned.normalized,
        "documents_kept_after_filters": reasons.get("kept", 0),
        "documents_out": total["docs_train"] + total["docs_val"],
        "dropped": {k: v for k, v in sorted(reasons.items()) if k != "kept"},
        "dropped_first": dict(sorted(cleaned.first.items())),
        "read_errors": cleaned.read_errors + rendered.read_errors,
        "pii_redacted": cleaned.pii, "utf8_replacements": cleaned.utf8, **dedup_stats,
        "tokens_train": total["tokens_train"], "tokens_val": total["tokens_val"],
        "sequences_train": total["rows_train"], "sequences_val": total["rows_val"],
        "remainder_tokens_dropped": total["remainder_tokens"],
        "bytes_per_token": round(total["text_bytes"] / max(tokens, 1), 4), "shards": total["shards"],
        "vocab_size": vocab_size, "seq_len": dc.seq_len, "sft": rendered.counts, "sft_dropped": rendered.dropped,
    }


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
