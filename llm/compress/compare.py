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
from llm.eval import EvalSettings, evaluate_models, prompt_pairs
from llm.eval.table import ROW_DOC


def heldout_records(tokens: Tokens, limit: int) -> list[Any]:
    """Up to `limit` chat records on the val side of the split of `tokens`' sources (empty without sources)."""
    return [{"messages": msgs} for msgs in held_out(tokens.sources, tokens.val_fraction, limit=limit)]


def settings(cfg: PipelineConfig) -> EvalSettings:
    """`EvalSettings` of the compress section: every model in the table is measured with these."""
    ev = cfg.compress.eval
    return EvalSettings(batch_size=ev.batch_size, val_rows=ev.val_rows, sft_rows=ev.sft_rows,
                        max_new_tokens=ev.max_new_tokens, speed_tokens=ev.speed_tokens, device=cfg.compress.device,
                        serve_batch=ev.serve_batch)


def compare(cfg: PipelineConfig, models: dict[str, Path], tokens: Tokens) -> list[dict[str, Any]]:
    """Rows of `llm.eval.evaluate_models` for `models` (name -> directory), the original first, on the val
    splits of `tokens` (checked local copies of them with `storage` in a store): packed val text where there
    is some, SFT val rows where there are some."""

    def val(folder: storage.Folder | None, kind: str) -> Path | None:
        if folder is None or not any(rel.endswith(".parquet") and "/" not in rel for rel in folder.list(kind, "val")):
            return None
        return folder.fetch(kind, "val")

    pairs, _ = prompt_pairs(heldout_records(tokens, cfg.compress.eval.prompts))
    return evaluate_models({name: str(path) for name, path in models.items()},
                           packed_val=val(tokens.packed, "packed"), sft_val=val(tokens.sft, "sft"), prompts=pairs,
                           settings=settings(cfg))


def write_eval(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """`compress/eval.json` in the local folder `folder`: the rows and what each key means."""
    path = folder / "eval.json"
    path.write_text(json.dumps({"rows": rows, "keys": ROW_DOC}, indent=2) + "\n")
    return path
