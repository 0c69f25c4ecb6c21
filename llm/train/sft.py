"""SFT examples for fine-tuning, tokenized with the base model's own tokenizer and chat template.

The data stage renders SFT records with the data stage's tokenizer. A base that is not ours has another
vocabulary, so its records are rendered again here, from the same source records, into
`finetune/sft/{train,val}/`: the token ids fed to a model always come from that model's tokenizer. The
split is the data stage's (example hash against the same fraction), so held-out examples stay held out.

Sources: JSONL files or globs with OpenAI-style `messages` or `prompt`/`response` records, the built-in
`builtin:python-sft`, or a Hugging Face `datasets` folder written by `save_to_disk`. A bad record is
counted by reason and named (`path:line`, `folder[split][index]`), as in the data stage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.data.read import Unreadable
from llm.data.sft import records, sft_files
from llm.errors import ConfigError, DataError
from llm.eval.data import has_answer
from llm.eval.split import is_held_out
from llm.eval.turns import render_chat
from llm.models.chat import IGNORE, to_messages
from llm.models.stops import end_of_turn_ids

GENERIC_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""The template a base without one gets (GPT-2, most pretrained-only checkpoints): plain-text role headers,
each turn closed by the tokenizer's own eos, so the model learns to stop at a token it already has and
serving stops there (the project's `<|end|>` is not in a foreign vocabulary: it would be text)."""
NAMED_DROPS = 100
"""Dropped records named in `stats.json` (all are counted)."""
ROWS_PER_SHARD = 8192


def prepare_tokenizer(base: str | Path, out_dir: str | Path, key: str = "metadata.llm.finetune.base") -> Any:
    """The base's tokenizer completed for chat SFT and saved into `out_dir`: a pad token (eos: padding is
    masked) and, when the base has none, `GENERIC_TEMPLATE` (saved with every output)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: {base} has no tokenizer that loads ({first[:200]})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"{key}: the tokenizer in {base} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = GENERIC_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def source_records(sources: list[str], key: str) -> Iterator[tuple[str, Any]]:
    """(key, record, or the reason it cannot be one) of every record the sources name, in order (a file of
    another kind is a `ConfigError` naming `key`)."""
    for f in sft_files(sources, key):
        for rec_key, rec in records(f.path, f.kind, f.gz):
            yield rec_key, ("read_error" if isinstance(rec, Unreadable) else rec)


@dataclass
class Rendered:
    """What `render_sources` wrote and found."""

    counts: dict[str, int] = field(default_factory=dict)
    dropped: list[dict[str, str]] = field(default_factory=list)
    """The first `NAMED_DROPS` bad records: `{"record": key, "reason": reason}`."""
    val_records: list[list[dict[str, str]]] = field(default_factory=list)
    """Held-out conversations, for generation prompts."""

    def drop(self, key: str, reason: str) -> None:
        self.counts[f"dropped_{reason}"] = self.counts.get(f"dropped_{reason}", 0) + 1
        if len(self.dropped) < NAMED_DROPS:
            self.dropped.append({"record": key, "reason": reason})


def render_sources(tok: Any, sources: list[str], out_dir: str | Path, max_len: int, val_fraction: float,
                   key: str, *, train_tokens: int | None = None, val_rows: int | None = None) -> Rendered:
    """Render every record with `tok`'s own template (`llm.eval.turns.render_chat`: labels end at its
    end-of-turn token) into `<out_dir>/{train,val}/part-*.parquet` (`input_ids`, `labels`); the split is the
    data stage's (`llm.eval.split.is_held_out`). A system message the template refuses joins the first user
    turn (counted as `system_merged`); a record the template refuses otherwise is dropped (`template_error`).

    `train_tokens` and `val_rows` stop a side once it holds that many tokens or rows (compress calibrating and
    evaluating without distillation needs a few rows, not a whole data set rendered); None: every record.
    """
    result = Rendered(counts={"examples": 0, "truncated": 0, "system_merged": 0})
    rows: dict[str, list[tuple[list[int], list[int]]]] = {"train": [], "val": []}
    ends = end_of_turn_ids(tok)
    have = {"train": 0, "val": 0}  # tokens on the train side, rows on the val side
    full = {"train": math.inf if train_tokens is None else train_tokens,
            "val": math.inf if val_rows is None else val_rows}
    for rec_key, rec in source_records(sources, key):
        if all(have[side] >= full[side] for side in have):
            result.counts["stopped_early"] = 1
            break
        msgs = rec if isinstance(rec, str) else to_messages(rec)
        if isinstance(msgs, str):
            result.drop(rec_key, msgs)
            continue
        held = is_held_out(msgs, val_fraction)
        if have["val" if held else "train"] >= full["val" if held else "train"]:
            result.counts["not_rendered"] = result.counts.get("not_rendered", 0) + 1  # that side has enough
            continue
        try:
            ids, labels, merged = render_chat(tok, msgs, ends)
        except Exception:  # the template's own Jinja refused this conversation (roles out of order, ...)
            result.drop(rec_key, "template_error")
            continue
        result.counts["system_merged"] += merged
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            result.counts["truncated"] += 1
        if not has_answer(labels):  # truncation cut every answer token: nothing to learn
            result.drop(rec_key, "no_answer_tokens")
            continue
        rows["val" if held else "train"].append((ids, labels))
        have["val" if held else "train"] += 1 if held else len(ids)
        if held:
            result.val_records.append(msgs)
        result.counts["examples"] += 1
    for split, examples in rows.items():
        _write(examples, Path(out_dir) / split)
        result.counts[split] = len(examples)
    if not rows["train"]:
        raise DataError(f"{key}: no usable training example in {', '.join(sources)} "
                        f"({json.dumps(result.counts)}; first bad: {result.dropped[:3]})")
    (Path(out_dir) / "stats.json").write_text(json.dumps({"counts": result.counts, "dropped": result.dropped},
                                                         indent=2))
    return result


def _write(examples: list[tuple[list[int], list[int]]], folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(examples), ROWS_PER_SHARD)):
        part = examples[start:start + ROWS_PER_SHARD]
        table = pa.table({"input_ids": pa.array([e[0] for e in part], pa.list_(pa.int32())),
                          "labels": pa.array([e[1] for e in part], pa.list_(pa.int32()))})
        pq.write_table(table, folder / f"part-{n:05d}.parquet")


def max_token_id(files: list[str]) -> tuple[int, str | None]:
    """The largest `input_ids` value in the shards, and the file that holds it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    best, where = -1, None
    for f in files:
        col = pq.read_table(f, columns=["input_ids"]).column(0)
        value = pc.max(pc.list_flatten(col)).as_py() if len(col) else None
        if value is not None and value > best:
            best, where = int(value), f
    return best, where


def check_vocab(files: list[str], vocab_rows: int, base: str) -> None:
    """Every token id fed to the model has an embedding row, else a one-line error naming the shard."""
    top, where = max_token_id(files)
    if top >= vocab_rows:
        raise DataError(f"{where}: token id {top} but the base {base} has {vocab_rows} embedding rows; the SFT "
                        "examples were tokenized with another tokenizer")


__all__ = ["IGNORE", "Rendered", "check_vocab", "prepare_tokenizer", "render_sources", "source_records"]
