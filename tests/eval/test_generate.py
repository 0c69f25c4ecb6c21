"""Held-out prompts: pairs from records, greedy decoding that padding does not change, repeatable metrics."""

from __future__ import annotations

import pytest

from llm.eval import PromptPair, encode_prompts, generate_texts, generation_metrics, greedy_generate, prompt_pairs
from llm.eval.generate import pad_id
from llm.models.stops import stop_token_ids
from tests.eval.conftest import RECORDS


def test_pairs_from_messages_and_prompt_response_records():
    pairs, dropped = prompt_pairs([*RECORDS, {"messages": [{"role": "user", "content": "hi"}]}, {"q": 1}, "text"])
    assert len(pairs) == 4
    assert dropped == {"no_assistant": 1, "missing_field": 1, "not_an_object": 1}
    assert pairs[1] == PromptPair([{"role": "user", "content": "What is a tuple?"}], "An immutable sequence.")
    # The prompt runs up to the last assistant turn, earlier answers included.
    assert [m["content"] for m in pairs[2].messages] == ["Name a loop.", "for", "Another one?"]
    assert pairs[2].reference == "while loops repeat"
    assert prompt_pairs(RECORDS, limit=2)[0] == pairs[:2]


def test_prompts_end_with_the_generation_prompt(tok):
    pairs, _ = prompt_pairs(RECORDS)
    ids = encode_prompts(tok, pairs)
    text = tok.decode(ids[1])
    assert text == "<|user|>\nWhat is a tuple?<|end|>\n<|assistant|>\n"
    assert encode_prompts(tok, pairs, max_tokens=5)[1] == ids[1][-5:]


def test_left_padding_gives_the_batch_1_outputs(model, tok):
    prompts = encode_prompts(tok, prompt_pairs(RECORDS)[0])
    assert len({len(p) for p in prompts}) == len(prompts)  # every row of the batch is padded differently
    batched = greedy_generate(model, prompts, 12, pad=pad_id(tok), batch_size=len(prompts))
    alone = [greedy_generate(model, [p], 12, pad=pad_id(tok), batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)  # no stop ids given: the full budget, so the comparison is long
    assert len({tuple(t) for t in batched}) > 1


def test_stops_are_cut_and_text_batches_match(model, tok):
    pairs, _ = prompt_pairs(RECORDS)
    stop = stop_token_ids(tok, model.generation_config)  # the rule generate_texts and serving share
    assert stop == sorted({tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id})
    texts = generate_texts(model, tok, pairs, max_new_tokens=16, batch_size=4)
    assert texts == generate_texts(model, tok, pairs, max_new_tokens=16, batch_size=1)
    assert len(texts) == len(pairs)


def test_same_model_twice_gives_the_same_metrics(model, tok):
    pairs, _ = prompt_pairs(RECORDS)
    first = generation_metrics(model, tok, pairs, max_new_tokens=16)
    assert first == generation_metrics(model, tok, pairs, max_new_tokens=16)
    assert first["prompts"] == 4


def test_a_model_scored_against_its_own_answers_is_perfect(model, tok):
    # End to end: render, generate, decode and score agree with one another.
    pairs, _ = prompt_pairs(RECORDS)
    answers = generate_texts(model, tok, pairs, max_new_tokens=16)
    own = [PromptPair(p.messages, a) for p, a in zip(pairs, answers, strict=True)]
    out = generation_metrics(model, tok, own, max_new_tokens=16)
    assert out["exact_match"] == 1.0
    assert generation_metrics(model, tok, pairs, max_new_tokens=16)["exact_match"] == pytest.approx(0.0)


def test_a_tokenizer_without_chat_template_is_one_line(tok):
    from transformers import PreTrainedTokenizerFast

    from llm.errors import DataError

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(DataError, match="no chat template"):
        encode_prompts(bare, prompt_pairs(RECORDS)[0])


def test_eval_answers_end_at_a_foreign_templates_end_of_turn(tmp_path, monkeypatch):
    """A Qwen-style base (eos `<|endoftext|>`, turns closed by `<|im_end|>`) that answers `<|im_end|>` at once
    gives empty answers, as the endpoint would, not `max_new_tokens` of `<|im_end|>`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.eval import generate
    from tests.models.zoo import write_family

    folder = write_family("qwen2", tmp_path / "qwen2")
    qwen_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    qwen = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    head = torch.nn.Linear(64, qwen.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[qwen_tok.convert_tokens_to_ids("<|im_end|>")] = 10.0
    qwen.lm_head = head
    tokens: list[list[int]] = []
    real = generate.greedy_generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        tokens.extend(out)
        return out

    monkeypatch.setattr(generate, "greedy_generate", spy)
    pairs, _ = prompt_pairs(RECORDS)
    assert generate_texts(qwen, qwen_tok, pairs, max_new_tokens=6) == [""] * len(pairs)
    assert tokens == [[]] * len(pairs)
