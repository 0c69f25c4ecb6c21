"""lm-evaluation-harness in the eval table: the two built-in tasks written from held-out text, scored through
lm-eval's own Hugging Face backend on a zoo model (float and int8), checked against our own log-likelihoods."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llm.errors import ConfigError, DataError
from llm.eval import HarnessSettings, format_table, write_tasks
from llm.eval.harness import BUILTIN_TASKS, CHOICES, check_tasks, columns, passages, task_scores
from tests.models.conftest import zoo  # noqa: F401  (the session fixture)

WORDS = ("the for statement iterates over the items of any sequence in the order that they appear while the "
         "break statement leaves the innermost loop and continue goes on with the next iteration of it").split()


def _texts(n: int) -> list[str]:
    """`n` distinct held-out documents of 40 words."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) + f" number {i}" for i in range(n)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tasks_are_written_from_held_out_text(tmp_path: Path) -> None:
    texts = _texts(12)
    folder = write_tasks(tmp_path / "lm_eval", texts)
    ppl, cloze = _rows(folder / "llmray_ppl.jsonl"), _rows(folder / "llmray_cloze.jsonl")
    assert [r["text"] for r in ppl] == passages(texts) and len(ppl) == 12
    assert len(cloze) == 12
    for row, text in zip(cloze, passages(texts), strict=True):
        choices = row["choices"]
        assert len(choices) == CHOICES == len(set(choices))
        # The context and the gold ending are the passage; every other ending belongs to another passage.
        assert row["context"] + choices[row["gold"]] == text
        assert all(not text.endswith(c) for i, c in enumerate(choices) if i != row["gold"])
    assert {r["gold"] for r in cloze} != {0}  # the true ending is not always first
    spec = json.loads((folder / "llmray_cloze.yaml").read_text())  # JSON is YAML: lm-eval reads it
    assert spec["output_type"] == "multiple_choice" and spec["task"] == "llmray_cloze"


def test_too_little_held_out_text_is_one_line_naming_the_tasks(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="llmray_ppl, llmray_cloze: the held-out text gives 2 passages"):
        write_tasks(tmp_path, ["short text", *_texts(2)])


def test_unknown_task_names_the_key(tmp_path: Path) -> None:
    folder = write_tasks(tmp_path, _texts(8))
    check_tasks(HarnessSettings(BUILTIN_TASKS, folder))
    with pytest.raises(ConfigError, match=r"compress.eval.lm_eval.tasks: no_such_task: no such lm-eval task"):
        check_tasks(HarnessSettings(("llmray_ppl", "no_such_task"), folder, key="compress.eval.lm_eval"))


def test_columns_keep_metrics_and_drop_stderr_and_aliases() -> None:
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                 "exact_match,strict-match": 1.0, "f1,none": float("nan")}}}
    assert columns(results) == {"t/acc": 0.5, "t/exact_match[strict-match]": 1.0, "t/f1": None}


def _own_byte_perplexity(model, tokenizer, texts: list[str]) -> float:
    """What lm-eval's rolling log-likelihood should be: every token of each text scored after the prefix token
    (bos, else eos), the texts being shorter than the context."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total, size = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text)
            logp = torch.log_softmax(model(torch.tensor([[prefix, *ids]])).logits[0].float(), -1)
            total += float(sum(logp[i, t] for i, t in enumerate(ids)))
            size += len(text.encode())
    return math.exp(-total / size)


def test_scores_through_lm_eval_match_our_own_and_int8_is_scored_as_loaded(zoo: Callable[[str], Path],  # noqa: F811
                                                                          tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = zoo("llama")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    texts = _texts(8)
    settings = HarnessSettings(BUILTIN_TASKS, write_tasks(tmp_path / "lm_eval", texts), limit=6)
    got = task_scores(model, tokenizer, settings)
    assert set(got) == {"llmray_ppl/word_perplexity", "llmray_ppl/byte_perplexity", "llmray_ppl/bits_per_byte",
                        "llmray_cloze/acc", "llmray_cloze/acc_norm"}
    want = _own_byte_perplexity(model, tokenizer, passages(texts)[:6])
    assert got["llmray_ppl/byte_perplexity"] == pytest.approx(want, rel=1e-4)
    assert got["llmray_ppl/bits_per_byte"] == pytest.approx(math.log2(want), rel=1e-4)
    assert 0.0 <= got["llmray_cloze/acc"] <= 1.0 and got["llmray_cloze/acc"] * 6 == round(got["llmray_cloze/acc"] * 6)
    # An int8 model with tied embeddings (lm-eval would re-tie them) is scored as loaded: close, not equal.
    int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    quantized = task_scores(int8, tokenizer, settings)
    assert quantized["llmray_ppl/byte_perplexity"] == pytest.approx(want, rel=0.05)
    assert quantized["llmray_ppl/byte_perplexity"] != got["llmray_ppl/byte_perplexity"]
    assert not hasattr(int8, "__dict__") or "tie_weights" not in int8.__dict__  # the model is given back as it was
    table = format_table([{"model": "original", **got}, {"model": "int8", **quantized}])
    assert "llmray_cloze/acc" in table.splitlines()[0]


def test_too_little_text_leaves_the_built_in_tasks_out_with_one_line(tmp_path: Path, capsys) -> None:
    from llm.config.train import LmEvalConfig
    from llm.eval import conversation_text

    section = LmEvalConfig(tasks=["llmray_ppl", "hellaswag"], limit=4)
    chats = [[{"role": "user", "content": "Say apple twice."}, {"role": "assistant", "content": "apple apple"}]]
    settings = HarnessSettings.of(section, tmp_path / "t", lambda: conversation_text(chats * 2), "ft.lm_eval")
    assert settings is not None and settings.tasks == ("hellaswag",) and settings.task_dir is None
    said = capsys.readouterr().out
    assert "ft.lm_eval: lm-eval tasks llmray_ppl, llmray_cloze: the held-out text gives 0 passages" in said
    # Chat turns are short: passages are cut from all the conversations as one stream.
    settings = HarnessSettings.of(section, tmp_path / "t", lambda: conversation_text(chats * 60), "k")
    assert settings is not None and settings.task_dir == tmp_path / "t" and settings.tasks == tuple(section.tasks)
    assert HarnessSettings.of(LmEvalConfig(), tmp_path, lambda: [], "k") is None
