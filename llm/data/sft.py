"""Supervised fine-tuning examples: chat or instruction records read from their sources and rendered with
the tokenizer's chat template (`llm.models.chat.render`) into `input_ids` and `labels`; and the held-out
conversations of SFT sources (`held_out`), the one reader of the split rule for fine-tuning and compress."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llm import storage
from llm.data import builtin, checksums
from llm.data.read import (
    READ_ERRORS,
    Unreadable,
    bounded_lines,
    decode,
    open_binary,
    parse_json,
    read_error_message,
    without_surrogates,
)
from llm.data.sources import SourceFile, hf_rows, resolve
from llm.data.tokenizer import load_tokenizer
from llm.errors import ConfigError
from llm.eval.split import is_held_out
from llm.eval.turns import render_chat
from llm.models.chat import IGNORE, to_messages
from llm.models.stops import end_of_turn_ids

SFT_KINDS = ("jsonl", "builtin-sft", "hf-arrow")
"""The kinds of file an SFT source may resolve to (fine-tuning refuses the others by name)."""
NAMED_DROPS = 20
"""Dropped records a unit names (`file:line`, reason, detail); all are counted."""
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _fixed_strings(value: Any) -> Any:
    """`value` with lone surrogates in its strings replaced (`without_surrogates`): the tokenizer refuses them."""
    if isinstance(value, str):
        return without_surrogates(value)[0]
    if isinstance(value, list):
        return [_fixed_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _fixed_strings(v) for k, v in value.items()}
    return value


def records(path: str, kind: str, gz: bool) -> Iterator[tuple[str, Any]]:
    """(key, record or error reason) of every line of a JSONL file, or of a built-in SFT unit. A file that
    fails to read ends with `(path, Unreadable)`; the lines read before it are kept."""
    if kind == "builtin-sft":
        yield from builtin.sft_pairs(path)
        return
    if kind == "hf-arrow":
        try:
            for i, rec in hf_rows(path):
                yield f"{path}[{i}]", rec
        except (OSError, ValueError) as e:
            yield path, Unreadable(path, f"unreadable datasets Arrow shard ({e})")
        return
    src = SourceFile(path, kind, gz)
    try:
        with open_binary(src) as f:
            for lineno, line in bounded_lines(f, 64 << 20):
                if line is None:
                    yield f"{path}:{lineno}", "too_long"
                elif line.strip():
                    yield f"{path}:{lineno}", _record(decode(line)[0])
    except READ_ERRORS as e:
        yield path, Unreadable(path, read_error_message(e, src))


def _record(text: str) -> Any:
    """The record of one JSONL line, or the reason it is none (`bad_json`, `not_an_object`)."""
    record, error = parse_json(text)
    if error:
        return "bad_json"
    if isinstance(record, str):  # strings name reasons here: a JSON string is no record
        return "not_an_object"
    if _SURROGATE_ESCAPE.search(text):  # `\ud800` alone is valid JSON, not text: replaced, as the data stage does
        try:
            return _fixed_strings(record)
        except RecursionError:
            return "bad_json"
    return record


def sft_files(sources: list[str], key: str | None) -> list[SourceFile]:
    """The files SFT `sources` name, in order. With `key` (the config key naming them), a file of a kind that is
    not an SFT kind is a `ConfigError` naming it; without, every file is read as the data stage reads it."""
    files = resolve(sources)
    for f in files if key is not None else []:
        if f.kind not in SFT_KINDS:
            raise ConfigError(f"{key}: {f.path}: SFT sources are JSONL, builtin:python-sft or a datasets folder")
    return files


def held_out(sources: list[str], val_fraction: float, key: str | None = None,
             limit: int | None = None) -> list[list[dict[str, str]]]:
    """The conversations of SFT `sources` on the val side of the split (`llm.eval.split.is_held_out`), in
    source order; records that fail to read or are not valid conversations are skipped.

    Args:
        sources: `data.sft.sources`-style paths, globs, URIs, datasets folders or `builtin:python-sft`.
        val_fraction: the split's val fraction.
        key: the config key naming `sources` (fine-tuning): files of other kinds are a `ConfigError` naming
            it, checked even when `limit` is 0; None (compress): every file is read as the data stage's SFT
            units read it (other kinds as JSONL lines), and nothing is resolved when `limit` is 0.
        limit: stop after this many (None: all).
    """
    if not sources or (key is None and limit is not None and limit <= 0):
        return []
    files = sft_files(sources, key)
    out: list[list[dict[str, str]]] = []
    if limit is not None and limit <= 0:
        return out
    for f in files:
        for _key, rec in records(f.path, f.kind, f.gz):
            msgs = rec if isinstance(rec, (str, Unreadable)) else to_messages(rec)
            if not isinstance(msgs, (str, Unreadable)) and is_held_out(msgs, val_fraction):
                out.append(msgs)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def render_or_reason(tok: Any, msgs: list[dict[str, str]],
                     end_ids: list[int]) -> tuple[list[int], list[int]] | str:
    """`msgs` rendered as fine-tuning renders them (`llm.eval.turns.render_chat`: a system message a template
    refuses joins the first user turn; labels stop at the end-of-turn token `end_ids`), or the one-line
    error of a chat template that refuses the conversation (a Jinja `raise_exception` such as "roles must
    alternate"): the record is dropped as `template_error`, the stage goes on."""
    try:
        ids, labels, _ = render_chat(tok, msgs, end_ids)
        return ids, labels
    except Exception as e:  # the template is the tokenizer's own code (Jinja): what it raises is this record's
        return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def sft_unit(batch: dict[str, Any], *, tokenizer_dir: str, out_dir: str, max_len: int,
             val_fraction: float) -> dict[str, list]:
    """Ray Data UDF: one unit of SFT files rendered into `<out_dir>/sft/{train,val}/part-<unit>.parquet`
    (`out_dir` is the stage folder; checksums in `<out_dir>/_CHECKSUMS/sft-<unit>.json`); returns its counts,
    its files that failed to read (`read_errors`: JSON list of `{"file", "error"}`) and its first
    `NAMED_DROPS` dropped records (`dropped`: JSON list of `{"record": "file:line", "reason", "detail"}`)."""
    unit = int(batch["unit"][0])
    tok = load_tokenizer(storage.fetch(tokenizer_dir))  # the store's copy, cached on this node
    ends = end_of_turn_ids(tok)  # probed once per unit, not per record
    out: dict[bool, list[tuple[list[int], list[int]]]] = {False: [], True: []}
    counts: dict[str, int] = {"examples": 0, "truncated": 0}
    errors: list[dict[str, str]] = []
    named: list[dict[str, str]] = []

    def drop(key: str, reason: str, detail: str = "") -> None:
        counts[f"dropped_{reason}"] = counts.get(f"dropped_{reason}", 0) + 1
        if len(named) < NAMED_DROPS:
            named.append({"record": key, "reason": reason, "detail": detail})

    for f in json.loads(batch["files"][0]):
        for key, rec in records(f["path"], f["kind"], f["gz"]):
            if isinstance(rec, Unreadable):
                errors.append(rec._asdict())
                rec = "read_error"
            msgs = rec if isinstance(rec, str) else to_messages(rec)
            if isinstance(msgs, str):
                drop(key, msgs)
                continue
            rendered = render_or_reason(tok, msgs, ends)
            if isinstance(rendered, str):
                drop(key, "template_error", rendered)
                continue
            ids, labels = rendered
            if len(ids) > max_len:
                ids, labels = ids[:max_len], labels[:max_len]
                counts["truncated"] += 1
            if all(x == IGNORE for x in labels):  # truncation cut every answer token: nothing to learn
                drop(key, "no_answer_tokens")
                continue
            out[is_held_out(msgs, val_fraction)].append((ids, labels))
            counts["examples"] += 1
    written = []
    for side, name in ((False, "train"), (True, "val")):
        if out[side]:
            folder = Path(out_dir) / "sft" / name
            folder.mkdir(parents=True, exist_ok=True)
            table = pa.table({"input_ids": pa.array([e[0] for e in out[side]], pa.list_(pa.int32())),
                              "labels": pa.array([e[1] for e in out[side]], pa.list_(pa.int32()))})
            pq.write_table(table, folder / f"part-{unit:05d}.parquet")
            written.append(folder / f"part-{unit:05d}.parquet")
    checksums.record(out_dir, f"sft-{unit:05d}", written)
    counts.update(train=len(out[False]), val=len(out[True]))
    return {"unit": [unit], "counts": [json.dumps(counts)], "read_errors": [json.dumps(errors)],
            "dropped": [json.dumps(named)]}
