"""Supervised fine-tuning examples: chat or instruction records rendered with the tokenizer's chat template
into `input_ids` and `labels`, where labels are -100 everywhere but on the assistant's tokens.

Assistant spans are found by rendering prefixes of the conversation: the tokens between "everything before
this turn plus the generation prompt" and "everything up to the end of this turn" are the turn's answer,
its closing `<|end|>` included, so the model learns to stop. This works for any template whose turns begin
and end at special tokens, which is what chat templates are built around.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IGNORE = -100
ROLES = {"system", "user", "assistant"}


def to_messages(record: Any) -> list[dict[str, str]] | str:
    """The messages of a `{"messages": [...]}` or `{"prompt", "response"}` record, or why it is invalid."""
    if not isinstance(record, dict):
        return "not_an_object"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "bad_messages"
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return "bad_messages"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no_assistant"
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return "missing_field"


def _ids(tok: Any, messages: list[dict[str, str]], generation: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) if messages else ""
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def render(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """`input_ids` of the whole conversation and `labels` that keep only the assistant turns."""
    ids = _ids(tok, messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tok, messages[:i], True))
        end = len(_ids(tok, messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids, labels


def records(path: str, kind: str, gz: bool) -> Any:
    """(key, record or error reason) of every line of a JSONL file, or of a built-in SFT unit. A file that
    fails to read ends with `(path, Unreadable)`; the lines read before it are kept."""
    from llm.data import builtin
    from llm.data.read import READ_ERRORS, Unreadable, bounded_lines, decode, open_binary, read_error_message
    from llm.data.sources import SourceFile

    if kind == "builtin-sft":
        yield from builtin.sft_pairs(path)
        return
    if kind == "hf-arrow":
        from llm.data.sources import hf_rows

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
                    try:
                        yield f"{path}:{lineno}", json.loads(decode(line)[0])
                    except json.JSONDecodeError:
                        yield f"{path}:{lineno}", "bad_json"
    except READ_ERRORS as e:
        yield path, Unreadable(path, read_error_message(e, src))


def sft_unit(batch: dict[str, Any], *, tokenizer_dir: str, out_dir: str, max_len: int,
             val_fraction: float) -> dict[str, list]:
    """Ray Data UDF: one unit of SFT files rendered into `<out_dir>/sft/{train,val}/part-<unit>.parquet`
    (`out_dir` is the stage folder; checksums in `<out_dir>/_CHECKSUMS/sft-<unit>.json`); returns its counts and
    its files that failed to read (`read_errors`: JSON list of `{"file", "error"}`)."""
    from llm.data import checksums
    from llm.data.clean import stable_id
    from llm.data.pack import is_val
    from llm.data.read import Unreadable
    from llm.data.tokenizer import load_tokenizer

    unit = int(batch["unit"][0])
    tok = load_tokenizer(tokenizer_dir)
    out: dict[bool, list[tuple[list[int], list[int]]]] = {False: [], True: []}
    counts: dict[str, int] = {"examples": 0, "truncated": 0}
    errors: list[dict[str, str]] = []
    for f in json.loads(batch["files"][0]):
        for _key, rec in records(f["path"], f["kind"], f["gz"]):
            if isinstance(rec, Unreadable):
                errors.append(rec._asdict())
                rec = "read_error"
            msgs = rec if isinstance(rec, str) else to_messages(rec)
            if isinstance(msgs, str):
                counts[f"dropped_{msgs}"] = counts.get(f"dropped_{msgs}", 0) + 1
                continue
            ids, labels = render(tok, msgs)
            if len(ids) > max_len:
                ids, labels = ids[:max_len], labels[:max_len]
                counts["truncated"] += 1
            if all(x == IGNORE for x in labels):  # truncation cut every answer token: nothing to learn
                counts["dropped_no_answer_tokens"] = counts.get("dropped_no_answer_tokens", 0) + 1
                continue
            h = stable_id(json.dumps(msgs, sort_keys=True))
            out[bool(is_val(np.array([h]), val_fraction)[0])].append((ids, labels))
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
    return {"unit": [unit], "counts": [json.dumps(counts)], "read_errors": [json.dumps(errors)]}
