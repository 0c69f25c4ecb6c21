"""Read, normalize, filter, redact and fingerprint one unit of source files into one parquet file.

A unit (a few source files, in the resolved order) is one Ray task. Its output file is named after the unit,
so the cleaned corpus, and everything packed from it, is the same on every run whatever the scheduling.
Dropped rows stay in the file with their reason (the dedup and pack steps skip them); with `keep_dropped`
the unit also writes them aside into `dropped/<unit>.parquet`. MinHash signatures go to `<unit>.sig` beside
the cleaned file (raw uint32 rows, one per parquet row): dedup reads only the rows it needs from there.
The unit's result carries its counts (drop reasons, the first `file:line` of each, documents normalization
changed, PII replacements, invalid UTF-8) and the files that failed to read, each with its error: the stats
add those up without the driver reading any document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm.config import DataConfig
from llm.data import checksums, minhash
from llm.data.filters import document_filter, normalize
from llm.data.pii import KINDS, redact
from llm.data.read import Unreadable, read_rows
from llm.data.sources import SourceFile
from llm.eval.split import stable_id

WORK = "_work/clean"  # under the stage folder; removed before the commit
_ROWS_PER_GROUP = 512
_CHARS_PER_GROUP = 32_000_000


def unit_of(path: str) -> int:
    """The unit number of a cleaned file (`.../<unit>.parquet`)."""
    return int(path.rsplit("/", 1)[-1].split(".")[0])


def content_hash(text: str) -> int:
    """Hash of the normalized content for exact dedup: case and whitespace do not make a document new."""
    return stable_id(" ".join(text.casefold().split()))


def clean_row(r: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """One read row normalized, filtered and redacted; `reason` says why it is dropped (empty: kept)."""
    pii = dict.fromkeys(KINDS, 0)
    text = r["text"]
    changed = False
    if not r["reason"]:
        text = normalize(text)
        changed = text != r["text"]
        reason = document_filter(text, cfg)
        if reason is None and cfg.pii.enabled:
            text, counts = redact(text, cfg.pii.kinds)
            pii.update(counts)
        r = {**r, "reason": reason or ""}
    return {**r, "text": text if not r["reason"] or cfg.keep_dropped else "",
            "doc_id": stable_id(r["source"]), "content_hash": content_hash(text) if not r["reason"] else 0,
            "normalized": changed, **{f"pii_{k}": v for k, v in pii.items()}}


def _schema(num_perm: int) -> pa.Schema:
    return pa.schema([("text", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                      ("utf8_errors", pa.int32()), ("doc_id", pa.int64()), ("content_hash", pa.int64()),
                      *[(f"pii_{k}", pa.int32()) for k in KINDS]])


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([pa.array([r[f.name] for r in rows], type=f.type) for f in schema], schema=schema)


def _signatures(rows: list[dict[str, Any]], cfg: DataConfig) -> np.ndarray:
    """(len(rows), num_perm) uint32: the kept rows' MinHash signatures; dropped rows (never read) all EMPTY."""
    fz = cfg.dedup.fuzzy
    sig = np.full((len(rows), fz.num_perm), minhash.EMPTY, dtype=np.uint32)
    kept = [i for i, r in enumerate(rows) if not r["reason"]]
    if fz.enabled and kept:
        sig[kept] = minhash.signatures([rows[i]["text"] for i in kept], num_perm=fz.num_perm, ngram=fz.ngram,
                                       seed=fz.seed)
    return sig


class _Counts:
    """A unit's aggregate counts: what the driver adds up instead of reading every row's reason."""

    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}
        self.first: dict[str, str] = {}
        """The source (`file:line`) of the first row dropped for each reason: where to look first."""
        self.pii = dict.fromkeys(KINDS, 0)
        self.utf8 = 0
        self.normalized = 0

    def add(self, r: dict[str, Any]) -> None:
        key = r["reason"] or "kept"
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if r["reason"]:
            self.first.setdefault(key, r["source"])
        self.utf8 += int(r["utf8_errors"])
        self.normalized += r["normalized"]
        for k in KINDS:
            self.pii[k] += r[f"pii_{k}"]

    def as_dict(self) -> dict[str, Any]:
        return {"reasons": self.reasons, "first": self.first, "pii": self.pii, "utf8": self.utf8,
                "normalized": self.normalized}


def clean_unit(batch: dict[str, Any], *, cfg: DataConfig, out_dir: str) -> dict[str, list]:
    """Ray Data UDF: one unit (`unit`, `files` as JSON) to `<out_dir>/_work/clean/<unit>.parquet` and `.sig`.

    Returns its path and row count, its counts (`counts`: JSON of drop reasons, PII replacements per kind,
    invalid UTF-8 replacements) and its files that failed to read (`read_errors`: JSON list of `{"file",
    "error"}`). With `cfg.keep_dropped`, the dropped rows go to `<out_dir>/dropped/<unit>.parquet`,
    checksummed in `<out_dir>/_CHECKSUMS/clean-<unit>.json` (`out_dir` is the stage folder).
    """
    unit = int(batch["unit"][0])
    files = [SourceFile(**f) for f in json.loads(batch["files"][0])]
    path = Path(out_dir) / WORK / f"{unit:06d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(out_dir) / "dropped" / f"{unit:06d}.parquet" if cfg.keep_dropped else None
    aside_schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("reason", pa.string())])
    aside_writer: pq.ParquetWriter | None = None
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    counts = _Counts()
    n = chars = 0
    schema = _schema(cfg.dedup.fuzzy.num_perm)
    with pq.ParquetWriter(path, schema) as writer, open(path.with_suffix(".sig"), "wb") as sig_file:
        def flush() -> None:
            nonlocal aside_writer
            writer.write_table(_table(rows, schema))
            sig_file.write(_signatures(rows, cfg).tobytes())
            dropped = [r for r in rows if r["reason"]]
            if aside is not None and dropped:
                if aside_writer is None:
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    aside_writer = pq.ParquetWriter(aside, aside_schema)
                aside_writer.write_table(_table(dropped, aside_schema))

        for src in files:
            for r in read_rows(src, text_field=cfg.text_field, max_chars=cfg.max_chars):
                if r["reason"] == "read_error":  # before clean_row, which blanks a dropped row's text
                    errors.append(Unreadable(r["source"], r["text"])._asdict())
                rows.append(clean_row(r, cfg))
                counts.add(rows[-1])
                chars += len(rows[-1]["text"])
                if len(rows) >= _ROWS_PER_GROUP or chars >= _CHARS_PER_GROUP:  # bounded memory
                    flush()
                    n, rows, chars = n + len(rows), [], 0
        if rows or n == 0:
            flush()
            n += len(rows)
    if aside is not None and aside_writer is not None:
        aside_writer.close()
        checksums.record(out_dir, f"clean-{unit:06d}", [aside])
    return {"unit": [unit], "path": [str(path)], "rows": [n], "counts": [json.dumps(counts.as_dict())],
            "read_errors": [json.dumps(errors)]}
