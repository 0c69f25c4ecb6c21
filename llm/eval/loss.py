"""Token losses: perplexity on packed val sequences, and loss over assistant tokens only on SFT rows.

Both sum next-token negative log-likelihoods and divide by the tokens scored over the whole set, so a
short last batch or a batch with few assistant tokens weighs exactly as many tokens as it holds (a mean
of per-batch means would not). Both go through `token_nll`, so the two figures are computed one way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm.errors import DataError
from llm.eval.data import has_answer
from llm.models.chat import IGNORE


def model_device(model: Any) -> Any:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def token_nll(model: Any, input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over positions whose label is not -100, and their count.

    Args:
        model: a causal LM returning `.logits`.
        input_ids: (batch, seq) token ids.
        labels: (batch, seq) targets aligned with `input_ids`; token t is predicted from tokens before it.
        attention_mask: (batch, seq) 1 on real tokens, 0 on padding; None when nothing is padded.
    """
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # float32 for the reduction: a bf16 model's summed loss over many tokens would lose digits.
        shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        nll = F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
    return float(nll), int((targets != IGNORE).sum())


def summary(nll: float, tokens: int) -> dict[str, Any]:
    """`loss` (mean nll per token), `ppl` = exp(loss), `tokens`; loss and ppl are None with no tokens."""
    if tokens == 0:
        return {"loss": None, "ppl": None, "tokens": 0}
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def packed_perplexity(model: Any, rows: np.ndarray, batch_size: int = 8) -> dict[str, Any]:
    """Mean token loss and perplexity of packed sequences, which are their own labels.

    Args:
        model: a causal LM (put in eval mode by the caller).
        rows: (rows, seq_len) token ids, e.g. from `llm.eval.data.packed_rows`; every row is scored.
        batch_size: rows per forward pass; the figure does not depend on it.

    Returns:
        `{"loss", "ppl", "tokens"}` over every predicted token (seq_len - 1 per row).
    """
    import torch

    device = model_device(model)
    nll, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids = torch.as_tensor(np.asarray(rows[start:start + batch_size], dtype=np.int64), device=device)
        n, t = token_nll(model, ids, ids)
        nll, tokens = nll + n, tokens + t
    return summary(nll, tokens)


def pad_batch(rows: Sequence[dict[str, Any]], pad_id: int, device: Any = None) -> dict[str, Any]:
    """SFT rows right-padded to the longest in the batch: -100 labels and mask 0 on padding."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _check(row: Any, index: int) -> None:
    where = row.get("source", f"row {index}") if isinstance(row, dict) else f"row {index}"
    if not isinstance(row, dict) or "input_ids" not in row or "labels" not in row:
        raise DataError(f"{where}: an SFT row needs input_ids and labels")
    if len(row["input_ids"]) != len(row["labels"]):
        raise DataError(f"{where}: {len(row['input_ids'])} input_ids but {len(row['labels'])} labels")


def assistant_loss(model: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                   pad_id: int = 0) -> dict[str, Any]:
    """Loss and perplexity over assistant tokens only (labels != -100), token-weighted across the set.

    Args:
        model: a causal LM (put in eval mode by the caller).
        rows: `{"input_ids", "labels"}` rows as `llm.data.sft` writes them (or re-rendered with another
            tokenizer by `llm.eval.data.render_rows`); padded per batch with an attention mask.
        batch_size: rows per forward pass; the figure does not depend on it.
        pad_id: id written on padding (masked, and never a target, so any valid id works).

    Returns:
        `{"loss", "ppl", "tokens", "skipped"}`; rows without an assistant token are `skipped`, not fatal.

    Raises:
        DataError: a row without both columns, or with `input_ids` and `labels` of different lengths.
    """
    for i, row in enumerate(rows):
        _check(row, i)
    scored = [r for r in rows if has_answer(r["labels"])]
    device = model_device(model)
    nll, tokens = 0.0, 0
    for start in range(0, len(scored), batch_size):
        batch = pad_batch(scored[start:start + batch_size], pad_id, device)
        n, t = token_nll(model, **batch)
        nll, tokens = nll + n, tokens + t
    return {**summary(nll, tokens), "skipped": len(rows) - len(scored)}
