"""Read, normalize, filter, redact and fingerprint one unit of source files into one parquet file.

A unit (a few source files, in the resolved order) is one Ray task. Its output file is named after the unit,
so the cleaned corpus, and everything packed from it, is the same on every run whatever the scheduling.
Dropped rows stay in the file with their reason: they are counted (and optionally written aside) later.
Files that failed to read come back with the unit's result, each with its error: the stats name them without
the driver reading any document.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm.config import DataConfig
from llm.data import minhash
from llm.data.filters import document_filter, normalize
from llm.data.pii import KINDS, redact
from llm.data.read import Unreadable, read_rows
from llm.data.sources import SourceFile

_ROWS_PER_GROUP = 512
_CHARS_PER_GROUP = 32_000_000


def stable_id(key: str) -> int:
    """A 63-bit id of a string that is the same in every process (Python's `hash` is salted)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "little") >> 1


def content_hash(text: str) -> int:
    """Hash of the normalized content for exact dedup: case and whitespace do not make a document new."""
    return stable_id(" ".join(text.casefold().split()))


def clean_row(r: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """One read row normalized, filtered and redacted; `reason` says why it is dropped (empty: kept)."""
    pii = dict.fromkeys(KINDS, 0)
    text = r["text"]
    if not r["reason"]:
        text = normalize(text)
        reason = document_filter(text, cfg)
        if reason is None and cfg.pii.enabled:
            text, counts = redact(text, cfg.pii.kinds)
            pii.update(counts)
        r = {**r, "reason": reason or ""}
    return {**r, "text": text if not r["reason"] or cfg.keep_dropped else "",
            "doc_id": stable_id(r["source"]), "content_hash": content_hash(text) if not r["reason"] else 0,
            **{f"pii_{k}": v for k, v in pii.items()}}


def _schema(num_perm: int) -> pa.Schema:
    return pa.schema([("text", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                      ("utf8_errors", pa.int32()), ("doc_id", pa.int64()), ("content_hash", pa.int64()),
                      *[(f"pii_{k}", pa.int32()) for k in KINDS], ("sig", pa.list_(pa.uint32(), num_perm))])


def _table(rows: list[dict[str, Any]], cfg: DataConfig) -> pa.Table:
    fz = cfg.dedup.fuzzy
    sig = np.full((len(rows), fz.num_perm), minhash.EMPTY, dtype=np.uint32)
    kept = [i for i, r in enumerate(rows) if not r["reason"]]
    if fz.enabled and kept:
        sig[kept] = minhash.signatures([rows[i]["text"] for i in kept], num_perm=fz.num_perm, ngram=fz.ngram,
                                       seed=fz.seed)
    schema = _schema(fz.num_perm)
    cols = {name: [r[name] for r in rows] for name in schema.names if name != "sig"}
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema if f.name != "sig"]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel(), pa.uint32()), fz.num_perm))
    return pa.Table.from_arrays(arrays, schema=schema)


def clean_unit(batch: dict[str, Any], *, cfg: DataConfig, out_dir: str) -> dict[str, list]:
    """Ray Data UDF: one unit (`unit`, `files` as JSON) to `<out_dir>/<unit>.parquet`; returns its size and
    its files that failed to read (`read_errors`: JSON list of `{"file", "error"}`)."""
    import json

    unit = int(batch["unit"][0])
    files = [SourceFile(**f) for f in json.loads(batch["files"][0])]
    path = Path(out_dir) / f"{unit:06d}.parquet"
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    n = chars = 0
    with pq.ParquetWriter(path, _schema(cfg.dedup.fuzzy.num_perm)) as writer:
        for src in files:
            for r in read_rows(src, text_field=cfg.text_field, max_chars=cfg.max_chars):
                if r["reason"] == "read_error":  # before clean_row, which blanks a dropped row's text
                    errors.append(Unreadable(r["source"], r["text"])._asdict())
                rows.append(clean_row(r, cfg))
                chars += len(rows[-1]["text"])
                if len(rows) >= _ROWS_PER_GROUP or chars >= _CHARS_PER_GROUP:  # bounded memory
                    writer.write_table(_table(rows, cfg))
                    n, rows, chars = n + len(rows), [], 0
        if rows or n == 0:
            writer.write_table(_table(rows, cfg))
            n += len(rows)
    return {"unit": [unit], "path": [str(path)], "rows": [n], "read_errors": [json.dumps(errors)]}
