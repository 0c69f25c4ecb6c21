"""Token losses: only assistant tokens count, every token weighs the same, perplexity is exp(loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm.errors import DataError
from llm.eval import assistant_loss, packed_perplexity, token_nll
from llm.models.chat import IGNORE, render


def _one(row):
    return {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}


def _by_hand(model, row):
    """Mean nll of the assistant positions of one row, straight from the logits (no llm.eval code)."""
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    picked = [-logp[t - 1, row["input_ids"][t]].item() for t in range(1, len(ids[0])) if row["labels"][t] != IGNORE]
    return sum(picked) / len(picked), len(picked)


def test_loss_is_over_assistant_tokens_only(model, sft_val):
    row = sft_val[0]
    loss, n = _by_hand(model, row)
    out = assistant_loss(model, [row])
    assert out["tokens"] == n == sum(x != IGNORE for x in row["labels"])
    assert out["loss"] == pytest.approx(loss, rel=1e-5)


def test_changing_masked_tokens_keeps_the_loss(model, tok, sft_val):
    # A conversation that ends with a user turn: those tokens are masked, and nothing after them is scored.
    msgs = [{"role": "user", "content": "Name a loop."}, {"role": "assistant", "content": "for loops"},
            {"role": "user", "content": "Thanks, that is what I needed to know."}]
    ids, labels = render(tok, msgs)
    last = max(j for j, x in enumerate(labels) if x != IGNORE)
    tail = range(last + 1, len(ids))
    assert len(tail) > 3 and all(labels[i] == IGNORE for i in tail)
    before = assistant_loss(model, [{"input_ids": ids, "labels": labels}])["loss"]
    changed = [(t + 7) % 300 if i in tail else t for i, t in enumerate(ids)]
    assert changed != ids
    assert assistant_loss(model, [{"input_ids": changed, "labels": labels}])["loss"] == pytest.approx(before, rel=1e-6)
    # Padding is masked too: whatever id fills it, a short row padded next to a long one scores the same.
    pair = [sft_val[1], sft_val[3]]
    assert len(pair[0]["input_ids"]) != len(pair[1]["input_ids"])
    padded = [assistant_loss(model, pair, batch_size=2, pad_id=p)["loss"] for p in (0, 123)]
    assert padded[0] == pytest.approx(padded[1], rel=1e-6)


def test_changing_an_assistant_token_changes_the_loss(model, sft_val):
    row = _one(sft_val[0])
    before = assistant_loss(model, [row])["loss"]
    i = next(j for j, x in enumerate(row["labels"]) if x != IGNORE)
    row["input_ids"][i] = row["labels"][i] = (row["input_ids"][i] + 7) % 300
    assert abs(assistant_loss(model, [row])["loss"] - before) > 1e-4


def test_loss_is_token_weighted_across_batches(model, sft_val):
    a, b = sft_val[1], sft_val[3]
    (la, na), (lb, nb) = _by_hand(model, a), _by_hand(model, b)
    assert na != nb and abs(la - lb) > 1e-3  # else a mean of batch means would give the same figure
    weighted = (la * na + lb * nb) / (na + nb)
    out = assistant_loss(model, [a, b], batch_size=1)
    assert out["tokens"] == na + nb
    assert out["loss"] == pytest.approx(weighted, rel=1e-5)
    assert abs(out["loss"] - (la + lb) / 2) > 1e-4
    # Padding a short row next to a long one changes nothing: the mask and -100 labels hide the padding.
    assert assistant_loss(model, [a, b], batch_size=2)["loss"] == pytest.approx(weighted, rel=1e-5)


def test_perplexity_is_exp_loss(model, sft_val):
    out = assistant_loss(model, sft_val)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)
    rows = np.random.default_rng(0).integers(0, 300, size=(5, 24))
    val = packed_perplexity(model, rows, batch_size=2)
    assert val["ppl"] == pytest.approx(math.exp(val["loss"]), rel=1e-12)


def test_packed_loss_matches_transformers_loss(model):
    rows = np.random.default_rng(1).integers(0, 300, size=(6, 24))
    ids = torch.as_tensor(rows)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss.item()
    # Batches of 4 then 2: an uneven last batch must not tilt the mean.
    out = packed_perplexity(model, rows, batch_size=4)
    assert out["tokens"] == 6 * 23
    assert out["loss"] == pytest.approx(reference, rel=1e-5)


def test_rows_without_assistant_tokens_are_counted_not_scored(model, sft_val):
    empty = {"input_ids": sft_val[0]["input_ids"], "labels": [IGNORE] * len(sft_val[0]["labels"])}
    alone = assistant_loss(model, [sft_val[1]])
    out = assistant_loss(model, [empty, sft_val[1]])
    assert out["skipped"] == 1 and out["tokens"] == alone["tokens"]
    assert out["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    nothing = assistant_loss(model, [empty])
    assert nothing == {"loss": None, "ppl": None, "tokens": 0, "skipped": 1}


def test_bad_row_is_one_line_naming_it(model):
    with pytest.raises(DataError, match=r"^val\.parquet:3: 4 input_ids but 3 labels$"):
        assistant_loss(model, [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3], "source": "val.parquet:3"}])


def test_token_nll_counts_only_unmasked_targets(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, IGNORE]])
    nll, n = token_nll(model, ids, labels)
    assert n == 1
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    assert nll == pytest.approx(-logp[1, 7].item(), rel=1e-5)
