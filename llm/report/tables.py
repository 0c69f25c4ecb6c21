"""Tables people read: human column names with units, numbers rounded, columns that say nothing dropped, and
a box that scrolls sideways inside the page instead of widening it."""

from __future__ import annotations

import html
from typing import Any

# Raw key -> the column a reader sees. Keys not listed are shown with underscores as spaces.
LABELS: dict[str, str] = {
    "model": "model", "source": "from", "device": "device", "params": "parameters",
    "weights_mb": "in memory (MiB)", "disk_mb": "on disk (MiB)", "load_s": "load (s)",
    "val_loss": "val loss", "val_ppl": "val perplexity", "val_tokens": "val tokens",
    "sft_loss": "chat loss", "sft_ppl": "chat perplexity", "sft_tokens": "chat tokens",
    "sft_skipped": "chat rows skipped", "rouge_l": "ROUGE-L", "bleu": "BLEU", "exact_match": "exact match",
    "token_f1": "token F1", "prompts": "prompts", "tok_s_b1": "tokens/s (batch 1)", "tok_s_b8": "tokens/s (batch 8)",
    "tok_s_serve": "tokens/s (serving batch)",
    "peak_mem_mb": "peak decode memory (MiB)", "seconds": "time (s)", "final_loss": "final loss",
    "best_val_loss": "best val loss", "final_val_loss": "final val loss", "first_loss": "first loss",
    "step_time_s": "step (s)", "tokens_per_s": "tokens/s", "trainable_params": "trainable parameters",
    "base_sft_loss": "base chat loss", "tuned_sft_loss": "tuned chat loss", "documents_out": "documents kept",
    "documents_in": "documents read", "trial_id": "trial", "lr": "learning rate", "url": "URL",
    "ready_s": "ready (s)", "time_total_s": "time (s)", "training_iteration": "reports",
    "manifest sha256": "manifest sha256", "best": "",
}
_UNINFORMATIVE = {"-", "", "0", "0.0", "None"}


def label(key: str) -> str:
    """The column name a reader sees for a raw key (an lm-eval column `<task>/<metric>` as `<task>: <metric>`)."""
    task, slash, metric = key.partition("/")
    if slash:
        return f"{task}: {metric.replace('_', ' ')}"
    return LABELS.get(key, key.replace("_", " "))


def fmt(v: Any) -> str:
    """A cell: `-` for missing, floats to 4 significant digits with thousands separators."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}"
    return str(v)


def informative(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """Columns with at least one value that is not missing or zero (a column of 0.0 for every model tells
    nothing); the first column (the row's name) always stays."""
    return [c for i, c in enumerate(columns) if i == 0 or any(fmt(r.get(c)) not in _UNINFORMATIVE for r in rows)]


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """An HTML table of `rows` inside a sideways-scrolling box."""
    if not rows:
        return "<p>(no rows)</p>"
    columns = informative(rows, columns or list(rows[0]))
    head = "".join(f"<th>{html.escape(label(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'
