"""Tokenize and pack: documents joined by the end-of-text token into rows of exactly `seq_len` tokens.

A pack unit is a contiguous run of cleaned files, tokenized in one Ray Data task. Inside a unit, documents
go to train or validation by content hash, each split fills its own token buffer in document order, and
every full `rows_per_shard` rows become one parquet shard. Only the last, partial row of each split of each
unit is dropped (fewer than `seq_len` tokens per unit and split); it is counted as `remainder_tokens`.
No padding is ever written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm import storage
from llm.data import checksums, shuffle
from llm.data.clean import unit_of
from llm.data.tokenizer import fast_tokenizer
from llm.eval.split import is_val
from llm.models.chat import EOS

_DOCS_PER_ENCODE = 256


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int, carry: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `seq_len` tokens from documents each followed by `eos_id`, and the tokens left over.

    Args:
        token_lists: the documents' token ids, in order.
        eos_id: the end-of-text id appended after every document.
        seq_len: tokens per row.
        carry: leftover tokens of the previous call, placed first.
    """
    parts = [carry] if carry is not None and len(carry) else []
    for ids in token_lists:
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(np.array([eos_id], dtype=np.int32))
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len), flat[n * seq_len:]


def rows_table(rows: np.ndarray) -> pa.Table:
    """A table with one `input_ids` list<int32> column from an (n, seq_len) array."""
    n, length = rows.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(rows.ravel(), pa.int32()))})


class _Split:
    """One split's token buffer and shard writer within a unit."""

    def __init__(self, folder: Path, unit: int, eos_id: int, seq_len: int, rows_per_shard: int) -> None:
        self.folder, self.unit, self.eos_id, self.seq_len, self.cap = folder, unit, eos_id, seq_len, rows_per_shard
        self.carry = np.zeros(0, np.int32)
        self.pending: list[np.ndarray] = []
        self.rows = self.tokens = self.docs = 0
        self.shards: list[str] = []

    def add(self, token_lists: list[list[int]]) -> None:
        self.docs += len(token_lists)
        self.tokens += sum(len(t) + 1 for t in token_lists)
        rows, self.carry = pack(token_lists, self.eos_id, self.seq_len, self.carry)
        if len(rows):
            self.pending.append(rows)
        while sum(len(r) for r in self.pending) >= self.cap:
            self._flush(self.cap)

    def _flush(self, limit: int) -> None:
        block = np.concatenate(self.pending)
        out, rest = block[:limit], block[limit:]
        self.pending = [rest] if len(rest) else []
        if not len(out):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{self.unit:05d}-{len(self.shards):04d}.parquet"
        pq.write_table(rows_table(out), path)
        self.shards.append(str(path))
        self.rows += len(out)

    def close(self) -> None:
        if self.pending:
            self._flush(sum(len(r) for r in self.pending))


def pack_unit(batch: dict[str, Any], *, tokenizer_dir: str, out_dir: str, seq_len: int, val_fraction: float,
              rows_per_shard: int, marks: list[str]) -> dict[str, list]:
    """Ray Data UDF: one unit (`unit`, `paths` of cleaned files) tokenized and packed into shards under
    `<out_dir>/packed/{train,val}/` (`out_dir` is the stage folder), checksummed in
    `<out_dir>/_CHECKSUMS/pack-<unit>.json`; documents marked in `marks` (dedup's folders) are left out.
    The keyword arguments are the job's `fn_kwargs`, one per setting the unit needs (hence seven)."""
    unit = int(batch["unit"][0])
    tok_dir = storage.fetch(tokenizer_dir)  # the store's copy, cached on this node
    tok = fast_tokenizer(tok_dir)
    eos = tok.token_to_id(EOS)
    if eos is None:  # a given tokenizer: its own eos, recorded at save time
        cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
        eos_tok = cfg.get("eos_token")
        eos = tok.token_to_id(eos_tok["content"] if isinstance(eos_tok, dict) else eos_tok)
    splits = [_Split(Path(out_dir) / "packed" / name, unit, eos, seq_len, rows_per_shard) for name in ("train", "val")]
    text_bytes = 0
    for path in str(batch["paths"][0]).split("\n"):
        drop = shuffle.marks_of_unit(marks, unit_of(path))
        fs, inside = storage.resolve(path)
        pf = pq.ParquetFile(fs.open_input_file(inside))
        row = 0
        for rb in pf.iter_batches(batch_size=_DOCS_PER_ENCODE, columns=["text", "reason", "content_hash"]):
            keep = pc.equal(rb.column("reason"), "").to_numpy(zero_copy_only=False)
            if len(drop):
                keep &= ~np.isin(np.arange(row, row + len(keep)), drop)
            row += len(keep)
            if not keep.any():
                continue
            text = rb.column("text").filter(pa.array(keep))
            texts = text.to_pylist()
            val = is_val(rb.column("content_hash").to_numpy()[keep], val_fraction)
            text_bytes += int(pc.sum(pc.binary_length(text.cast(pa.binary()))).as_py() or 0)
            encoded = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
            for side, split in zip((False, True), splits, strict=True):
                split.add([e for e, v in zip(encoded, val, strict=True) if v == side])
    for split in splits:
        split.close()
    checksums.record(out_dir, f"pack-{unit:05d}", [p for split in splits for p in split.shards])
    train_split, val_split = splits
    return {"unit": [unit], "docs_train": [train_split.docs], "docs_val": [val_split.docs],
            "tokens_train": [train_split.tokens], "tokens_val": [val_split.tokens],
            "rows_train": [train_split.rows], "rows_val": [val_split.rows],
            "remainder_tokens": [len(train_split.carry) + len(val_split.carry)], "text_bytes": [text_bytes],
            "shards": [len(train_split.shards) + len(val_split.shards)]}
