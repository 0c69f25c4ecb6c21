"""The comparison table: same keys for every model, the same numbers for the same weights however given."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from llm.errors import LLMRayError
from llm.eval import ROW_KEYS, EvalSettings, evaluate_models, format_table, prompt_pairs, render_rows
from tests.eval.conftest import RECORDS, tiny_model

SETTINGS = EvalSettings(batch_size=2, max_new_tokens=8, speed_tokens=4)


@pytest.fixture(scope="module")
def rows(model, tok, model_dir, sft_val):
    packed = np.random.default_rng(0).integers(0, 300, size=(6, 24))
    models = {"dir": model_dir, "same": (model, tok), "other": (tiny_model(tok, seed=1), tok)}
    return evaluate_models(models, packed_val=packed, sft_val=sft_val, prompts=prompt_pairs(RECORDS)[0],
                           settings=SETTINGS)


def test_every_row_has_the_same_keys_and_is_json(rows):
    assert [r["model"] for r in rows] == ["dir", "same", "other"]
    assert all(list(r) == list(ROW_KEYS) for r in rows)
    back = json.loads(json.dumps(rows, allow_nan=False))
    assert back == rows
    for key in ("params", "val_loss", "sft_loss", "rouge_l", "bleu", "exact_match", "tok_s_b1", "tok_s_b8",
                "peak_mem_mb"):
        assert all(r[key] is not None for r in rows), key


def test_same_weights_give_the_same_numbers(rows):
    a, b, c = rows
    for key in ("params", "val_loss", "val_tokens", "sft_loss", "sft_tokens", "rouge_l", "bleu", "exact_match"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert a["val_ppl"] == pytest.approx(math.exp(a["val_loss"]))
    assert abs(a["val_loss"] - c["val_loss"]) > 1e-4  # other weights, other loss: the rows are not copies


def test_load_facts_only_for_directories(rows, model_dir, model):
    d, mem = rows[0], rows[1]
    assert d["source"] == str(model_dir) and mem["source"] == "in-memory"
    weights = (model_dir / "model.safetensors").stat().st_size / 2**20
    assert weights < d["disk_mb"] < weights + 5  # the weights plus tokenizer and config files
    assert d["load_s"] > 0 and mem["disk_mb"] is None and mem["load_s"] is None
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    assert buffers > 0
    assert d["weights_mb"] == pytest.approx((d["params"] * 4 + buffers) / 2**20)  # float32


def test_format_table_aligns_columns(rows):
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) and all(len(line) <= 160 for line in lines)
    assert len({len(line) for line in lines}) == 1  # figures are right-aligned to one edge
    assert lines[0].split()[:3] == ["model", "params", "disk"]
    assert lines[3].startswith("same ") and " - " in lines[3]  # no directory: disk and load time shown as -
    assert format_table(rows, ["model", "sft_skipped"]).splitlines()[2].split() == ["dir", "0"]
    # A column no row has a value in carries no information (a CPU peak that read 0.0 for every model).
    # (The measured peak may itself read 0.0 on a CPU-only machine, so both cases are set here.)
    peaked = [{**row, "peak_mem_mb": 12.5 if i == 0 else 0.0} for i, row in enumerate(rows)]
    flat = [{**row, "peak_mem_mb": 0.0} for row in rows]
    assert "peak" in format_table(peaked) and "peak" not in format_table(flat)


def test_sft_rows_re_rendered_per_tokenizer(model, tok, sft_val):
    seen = []

    def per_model(t):
        seen.append(t)
        return render_rows(t, RECORDS)

    [row] = evaluate_models({"m": (model, tok)}, sft_val=per_model, settings=SETTINGS)
    [given] = evaluate_models({"m": (model, tok)}, sft_val=sft_val, settings=SETTINGS)
    assert seen == [tok]
    # The same tokens; the data stage's labels also cover the newline after <|end|>, fine-tuning's (and
    # render_rows') stop at <|end|> (llm.eval.turns): one token fewer per answer.
    answers = sum(lab != -100 and (i + 1 == len(r["labels"]) or r["labels"][i + 1] == -100)
                  for r in sft_val for i, lab in enumerate(r["labels"]))
    assert row["sft_tokens"] == given["sft_tokens"] - answers
    assert row["sft_loss"] == pytest.approx(given["sft_loss"], rel=1e-2)
    assert row["val_loss"] is None and row["rouge_l"] is None and row["tok_s_b1"] is None


def test_speed_can_be_left_out(model, tok):
    from dataclasses import replace

    pairs = prompt_pairs(RECORDS)[0]
    [row] = evaluate_models({"m": (model, tok)}, prompts=pairs, settings=replace(SETTINGS, measure_speed=False))
    assert row["rouge_l"] is not None
    assert row["tok_s_b1"] is None and row["tok_s_b8"] is None and row["peak_mem_mb"] is None


def test_serving_speed_is_measured_at_the_serving_batch(model, tok, monkeypatch):
    """`tok_s_serve` is decoding at `serve_batch` (what compress weighs); batch 1 and 8 reuse their figure."""
    from dataclasses import replace

    import llm.eval.table as table

    batches = []
    real = table.tokens_per_second

    def spy(model, prompt, batch, *args, **kwargs):
        batches.append(batch)
        return real(model, prompt, batch, *args, **kwargs)

    monkeypatch.setattr(table, "tokens_per_second", spy)
    pairs = prompt_pairs(RECORDS)[0]
    [row] = evaluate_models({"m": (model, tok)}, prompts=pairs, settings=replace(SETTINGS, serve_batch=3))
    assert batches == [1, 8, 3] and row["tok_s_serve"] > 0
    batches.clear()
    [row] = evaluate_models({"m": (model, tok)}, prompts=pairs, settings=replace(SETTINGS, serve_batch=8))
    assert batches == [1, 8] and row["tok_s_serve"] == row["tok_s_b8"]
    [row] = evaluate_models({"m": (model, tok)}, prompts=pairs, settings=SETTINGS)
    assert row["tok_s_serve"] is None  # not asked for (fine-tuning's table)


def test_model_directory_without_weights_is_one_line(tmp_path, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(LLMRayError) as err:
        evaluate_models({"broken": broken}, settings=SETTINGS)
    assert str(broken) in str(err.value) and "\n" not in str(err.value)
