"""The one comparison table: the original and every variant on the same held-out tokens and prompts.

Numbers come from `llm.eval` (the module fine-tuning uses too): perplexity on packed val text (where there is
packed text in the original's tokenizer), loss over assistant tokens of the SFT val split, ROUGE-L on held-out
prompts, serving tokens/s and the model facts. The tokens are the ones `llm.compress.tokens` picked (the data
stage's, the fine-tuning data's, or rendered here); held-out prompts are the records on the val side of the
same chat sources, found by the same rule (`llm.data.sft.held_out`), so no model is scored on a conversation
it was fine-tuned on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm import storage
from llm.compress.tokens import Tokens
from llm.config import PipelineConfig
from llm.data.sft import held_out
from llm.data.tokenizer import load_tokenizer
from llm.eval import (
    DOCS,
    EvalSettings,
    HarnessSettings,
    conversation_text,
    evaluate_models,
    packed_rows,
    prompt_pairs,
)
from llm.eval.table import ROW_DOC, task_columns


def heldout_records(tokens: Tokens, limit: int) -> list[Any]:
    """Up to `limit` chat records on the val side of the split of `tokens`' sources (empty without sources)."""
    return [{"messages": msgs} for msgs in held_out(tokens.sources, tokens.val_fraction, limit=limit)]


HELD_OUT_TOKENS = 32_768
"""Packed val tokens decoded for the built-in lm-eval tasks (about `DOCS` passages of 64 words)."""


def settings(cfg: PipelineConfig, harness: HarnessSettings | None = None) -> EvalSettings:
    """`EvalSettings` of the compress section: every model in the table is measured with these."""
    ev = cfg.compress.eval
    return EvalSettings(batch_size=ev.batch_size, val_rows=ev.val_rows, sft_rows=ev.sft_rows,
                        max_new_tokens=ev.max_new_tokens, speed_tokens=ev.speed_tokens, device=cfg.compress.device,
                        serve_batch=ev.serve_batch, harness=harness)


def heldout_text(original: Path, packed_val: Path | None, records: list[Any]) -> list[str]:
    """Held-out text for the built-in lm-eval tasks: the packed val stream (rows are consecutive windows of it)
    decoded with the original's tokenizer where there is one (the pretraining distribution; enough tokens for
    `DOCS` passages), else the held-out conversations' text."""
    if packed_val is not None:
        tokenizer = load_tokenizer(original)
        stream = packed_rows(packed_val, DOCS).ravel()[:HELD_OUT_TOKENS]
        return [str(tokenizer.decode(stream.tolist(), skip_special_tokens=True))]
    return conversation_text([r["messages"] for r in records])


def compare(cfg: PipelineConfig, models: dict[str, Path], tokens: Tokens, task_dir: Path) -> list[dict[str, Any]]:
    """Rows of `llm.eval.evaluate_models` for `models` (name -> directory), the original first, on the val
    splits of `tokens` (checked local copies of them with `storage` in a store): packed val text where there
    is some, SFT val rows where there are some; the built-in lm-eval tasks, when asked for, are written from
    the same held-out text into `task_dir`."""

    def val(folder: storage.Folder | None, kind: str) -> Path | None:
        if folder is None or not any(rel.endswith(".parquet") and "/" not in rel for rel in folder.list(kind, "val")):
            return None
        return folder.fetch(kind, "val")

    records = heldout_records(tokens, cfg.compress.eval.prompts)
    pairs, _ = prompt_pairs(records)
    packed = val(tokens.packed, "packed")

    def text() -> list[str]:
        chats = heldout_records(tokens, DOCS) if packed is None else []
        return heldout_text(next(iter(models.values())), packed, chats)

    harness = HarnessSettings.of(cfg.compress.eval.lm_eval, task_dir, text, "metadata.llm.compress.eval.lm_eval")
    return evaluate_models({name: str(path) for name, path in models.items()}, packed_val=packed,
                           sft_val=val(tokens.sft, "sft"), prompts=pairs, settings=settings(cfg, harness))


def write_eval(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """`compress/eval.json` in the local folder `folder`: the rows and what each key means."""
    path = folder / "eval.json"
    tasks = {k: f"lm-eval task {k.split('/')[0]}, metric {k.split('/', 1)[1]}" for k in task_columns(rows)}
    path.write_text(json.dumps({"rows": rows, "keys": {**ROW_DOC, **tasks}}, indent=2) + "\n")
    return path
