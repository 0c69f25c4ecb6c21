"""The one comparison table: the original and every variant on the same held-out tokens and prompts.

Numbers come from `llm.eval` (the module fine-tuning uses too): perplexity on the data stage's packed val
split, loss over assistant tokens of its SFT val split, ROUGE-L on held-out prompts, and the model facts.
Held-out prompts are the records the data stage put on the val side of `data.sft.sources`, found by the
same rule (`llm.data.sft.held_out`), so no model is scored on a conversation it was fine-tuned on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm import storage
from llm.config import PipelineConfig
from llm.data.sft import held_out
from llm.eval import EvalSettings, evaluate_models, prompt_pairs
from llm.eval.table import ROW_DOC


def heldout_records(cfg: PipelineConfig, limit: int) -> list[Any]:
    """Up to `limit` SFT records on the val side of the data stage's split (empty without SFT sources)."""
    sft = cfg.data.sft
    return [{"messages": msgs} for msgs in held_out(sft.sources, sft.val_fraction, limit=limit)]


def settings(cfg: PipelineConfig) -> EvalSettings:
    """`EvalSettings` of the compress section: every model in the table is measured with these."""
    ev = cfg.compress.eval
    return EvalSettings(batch_size=ev.batch_size, val_rows=ev.val_rows, sft_rows=ev.sft_rows,
                        max_new_tokens=ev.max_new_tokens, speed_tokens=ev.speed_tokens, device=cfg.compress.device)


def compare(cfg: PipelineConfig, models: dict[str, Path], data: storage.Folder) -> list[dict[str, Any]]:
    """Rows of `llm.eval.evaluate_models` for `models` (name -> directory), the original first, on the val
    splits of the data stage's folder `data` (checked local copies of them with `storage` in a store)."""
    pairs, _ = prompt_pairs(heldout_records(cfg, cfg.compress.eval.prompts))
    has_sft = any(rel.endswith(".parquet") and "/" not in rel for rel in data.list("sft", "val"))
    return evaluate_models({name: str(path) for name, path in models.items()},
                           packed_val=data.fetch("packed", "val"),
                           sft_val=data.fetch("sft", "val") if has_sft else None, prompts=pairs,
                           settings=settings(cfg))


def write_eval(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """`compress/eval.json` in the local folder `folder`: the rows and what each key means."""
    path = folder / "eval.json"
    path.write_text(json.dumps({"rows": rows, "keys": ROW_DOC}, indent=2) + "\n")
    return path
