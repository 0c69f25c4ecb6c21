"""Supervised fine-tuning examples: chat or instruction records read from their sources and rendered with
the tokenizer's chat template (`llm.models.chat.render`) into `input_ids` and `labels`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm.models.chat import IGNORE, render, to_messages


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
    from llm.data.read import Unreadable
    from llm.data.tokenizer import load_tokenizer
    from llm.eval.split import is_val, stable_id

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
