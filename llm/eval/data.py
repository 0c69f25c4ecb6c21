"""Evaluation inputs: packed val token rows, SFT val rows, and held-out prompts with their references.

Rows are read in a fixed order (sorted shards, rows in file order) and cut at a fixed count, so two
models evaluated on the same inputs see the very same tokens. The SFT parquet keeps only token ids, so
prompts for generation come from message records (the source JSONL), rendered per model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.errors import DataError, StageInputError
from llm.eval.turns import render_chat
from llm.models.chat import IGNORE, to_messages
from llm.models.stops import end_of_turn_ids


@dataclass(frozen=True)
class PromptPair:
    """One held-out generation case."""

    messages: list[dict[str, str]]
    """The conversation up to (not including) its last assistant turn."""
    reference: str
    """The text of that last assistant turn."""


def _shards(folder: str | Path, kind: str) -> list[Path]:
    """Sorted val shards of `<run>/data/<kind>/val/`, given that folder, `<run>/data`, or the split itself."""
    root = Path(folder)
    split = root / kind / "val" if (root / kind / "val").is_dir() else root
    files = sorted(split.glob("*.parquet"))
    if not files:
        raise StageInputError(f"{split}: no parquet shards to evaluate on (expected <run>/data/{kind}/val/*.parquet)")
    return files


def packed_rows(folder: str | Path, max_rows: int | None = None) -> np.ndarray:
    """The first `max_rows` packed val sequences (all of them when None) as an int64 array (rows, seq_len).

    Args:
        folder: `<run>/data`, or a folder of packed parquet shards with an `input_ids` column.
        max_rows: how many rows to keep, in sorted-shard order.

    Raises:
        StageInputError: no shards. DataError: a shard without `input_ids` or with rows of unequal length.
    """
    import pyarrow.parquet as pq

    rows: list[np.ndarray] = []
    for path in _shards(folder, "packed"):
        if max_rows is not None and len(rows) >= max_rows:
            break
        table = pq.read_table(path)
        if "input_ids" not in table.column_names:
            raise DataError(f"{path}: no input_ids column")
        for i, ids in enumerate(table.column("input_ids").to_pylist()):
            if rows and len(ids) != len(rows[0]):
                raise DataError(f"{path}: row {i} has {len(ids)} tokens, other packed rows {len(rows[0])}")
            rows.append(np.asarray(ids, dtype=np.int64))
    if not rows:
        raise DataError(f"{folder}: the packed val shards hold no rows")
    return np.stack(rows[:max_rows] if max_rows is not None else rows)


def sft_rows(folder: str | Path, max_rows: int | None = None) -> list[dict[str, Any]]:
    """The first `max_rows` SFT val rows (`input_ids`, `labels`) written by the data stage, in order.

    Args:
        folder: `<run>/data`, or a folder of SFT parquet shards.
        max_rows: how many rows to keep (all when None).

    Raises:
        StageInputError: no shards. DataError: a shard without `input_ids` and `labels` columns.
    """
    import pyarrow.parquet as pq

    out: list[dict[str, Any]] = []
    for path in _shards(folder, "sft"):
        if max_rows is not None and len(out) >= max_rows:
            break
        table = pq.read_table(path)
        if not {"input_ids", "labels"} <= set(table.column_names):
            raise DataError(f"{path}: SFT shards need input_ids and labels columns (got {table.column_names})")
        ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
        pairs = enumerate(zip(ids, labels, strict=True))
        out.extend({"input_ids": a, "labels": b, "source": f"{path}:{i}"} for i, (a, b) in pairs)
    return out[:max_rows] if max_rows is not None else out


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Any]:
    """The first `limit` JSON records of a JSONL file (blank lines skipped).

    Raises:
        DataError: a line that is not JSON, named by `path:line`; a missing file.
    """
    records: list[Any] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(records) >= limit:
                    break
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return records


def render_rows(tokenizer: Any, records: Iterable[Any], source: str = "records") -> list[dict[str, Any]]:
    """SFT rows of message records rendered with `tokenizer`'s own chat template (as fine-tuning renders them:
    `llm.eval.turns.render_chat`), for comparing models that do not share a tokenizer.

    Records without an assistant turn become rows with no assistant tokens, which the loss counts as
    skipped rather than failing.

    Raises:
        DataError: a record that is not a `messages` or `prompt`/`response` record, named `source[index]`.
    """
    rows: list[dict[str, Any]] = []
    ends = end_of_turn_ids(tokenizer)
    for i, rec in enumerate(records):
        msgs = to_messages(rec)
        if msgs == "no_assistant":
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        if isinstance(msgs, str):
            raise DataError(f"{source}[{i}]: not an SFT record ({msgs})")
        ids, labels, _ = render_chat(tokenizer, msgs, ends)
        rows.append({"input_ids": ids, "labels": labels, "source": f"{source}[{i}]"})
    return rows


def prompt_pairs(records: Iterable[Any], limit: int | None = None) -> tuple[list[PromptPair], dict[str, int]]:
    """(prompt messages, reference) pairs of OpenAI-style `messages` or `prompt`/`response` records.

    The prompt is the conversation up to the last assistant turn, the reference that turn's text. Invalid
    records are skipped and counted by reason, like the data stage's drops.

    Args:
        records: parsed JSON records, in the order the pairs should keep.
        limit: stop after this many pairs.

    Returns:
        The pairs, and counts of skipped records per reason (`bad_messages`, `no_assistant`, ...).
    """
    pairs: list[PromptPair] = []
    dropped: dict[str, int] = {}
    for rec in records:
        if limit is not None and len(pairs) >= limit:
            break
        msgs = to_messages(rec)
        if isinstance(msgs, str):
            dropped[msgs] = dropped.get(msgs, 0) + 1
            continue
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        pairs.append(PromptPair(msgs[:last], msgs[last]["content"]))
    return pairs, dropped


def has_answer(labels: list[int]) -> bool:
    """Whether a row has an assistant token the loss can score (position 0 has nothing to predict it)."""
    return any(x != IGNORE for x in labels[1:])
