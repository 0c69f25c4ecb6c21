"""Fixtures for evaluation tests: the pipeline's chat tokenizer trained here on Python's help topics, a
tiny random 2-layer 64-wide Llama built from a config, and SFT records about Python.

No network and no data stage: rows are rendered with `llm.data.sft.render`, as the data stage does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm.models.chat import render

RECORDS: list[dict[str, Any]] = [
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What does the return statement do?"},
                  {"role": "assistant", "content": "It leaves the function with a value."}]},
    {"prompt": "What is a tuple?", "response": "An immutable sequence."},
    {"messages": [{"role": "user", "content": "Name a loop."}, {"role": "assistant", "content": "for"},
                  {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "while loops repeat"}]},
    {"prompt": "How do you raise an exception in a function that receives bad arguments?",
     "response": "Use the raise statement with an exception instance such as ValueError."},
]


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pydoc_data.topics import topics

    from llm.data.tokenizer import load_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    texts = [topics[k] for k in sorted(topics)[:40]]
    train_tokenizer(texts, folder, vocab_size=384, min_frequency=2)
    return load_tokenizer(folder)


def tiny_model(tok: Any, seed: int = 0) -> Any:
    """A random 2-layer, 64-wide Llama (float32, eval mode) sized to the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def model(tok: Any) -> Any:
    return tiny_model(tok)


@pytest.fixture(scope="session")
def sft_val(tok: Any) -> list[dict[str, Any]]:
    """SFT rows of `RECORDS` as the data stage writes them."""
    from llm.models.chat import to_messages

    rows = []
    for rec in RECORDS:
        msgs = to_messages(rec)
        assert not isinstance(msgs, str)
        ids, labels = render(tok, msgs)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, model: Any, tok: Any) -> Path:
    """`model` and its tokenizer saved as a Hugging Face directory."""
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
