"""The one comparison table: the original and every variant on the same held-out tokens and prompts.

Numbers come from `llm.eval` (the module fine-tuning uses too): perplexity on the data stage's packed val
split, loss over assistant tokens of its SFT val split, ROUGE-L on held-out prompts, and the model facts.
Held-out prompts are the records the data stage put on the val side of `data.sft.sources`, found by the
same hash rule, so no model is scored on a conversation it was fine-tuned on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm.config import PipelineConfig


def heldout_records(cfg: PipelineConfig, limit: int) -> list[Any]:
    """Up to `limit` SFT records on the val side of the data stage's split (empty without SFT sources)."""
    import numpy as np

    from llm.data.read import Unreadable
    from llm.data.sft import records
    from llm.data.sources import resolve
    from llm.eval.split import is_val, stable_id
    from llm.models.chat import to_messages

    sft = cfg.data.sft
    if not sft.sources or limit <= 0:
        return []
    out: list[Any] = []
    for src in resolve(sft.sources):
        for _key, rec in records(src.path, src.kind, src.gz):
            if isinstance(rec, (str, Unreadable)):
                continue
            msgs = to_messages(rec)
            if isinstance(msgs, str):
                continue
            h = stable_id(json.dumps(msgs, sort_keys=True))  # the data stage's split key (llm.data.sft)
            if bool(is_val(np.array([h]), sft.val_fraction)[0]):
                out.append({"messages": msgs})
                if len(out) >= limit:
                    return out
    return out


def settings(cfg: PipelineConfig) -> Any:
    """`EvalSettings` of the compress section: every model in the table is measured with these."""
    from llm.eval import EvalSettings

    ev = cfg.compress.eval
    return EvalSettings(batch_size=ev.batch_size, val_rows=ev.val_rows, sft_rows=ev.sft_rows,
                        max_new_tokens=ev.max_new_tokens, speed_tokens=ev.speed_tokens, device=cfg.compress.device)


def compare(cfg: PipelineConfig, models: dict[str, Path], data: Path) -> list[dict[str, Any]]:
    """Rows of `llm.eval.evaluate_models` for `models` (name -> directory), the original first."""
    from llm.eval import evaluate_models, prompt_pairs

    pairs, _ = prompt_pairs(heldout_records(cfg, cfg.compress.eval.prompts))
    has_sft = any((data / "sft" / "val").glob("*.parquet"))
    return evaluate_models({name: str(path) for name, path in models.items()}, packed_val=data,
                           sft_val=data if has_sft else None, prompts=pairs, settings=settings(cfg))


def write_eval(folder: Path, rows: list[dict[str, Any]]) -> Path:
    """`compress/eval.json`: the rows and what each key means."""
    from llm.eval.table import ROW_DOC

    path = folder / "eval.json"
    path.write_text(json.dumps({"rows": rows, "keys": ROW_DOC}, indent=2) + "\n")
    return path
