"""Fixtures for compression tests: the eval tests' chat tokenizer and tiny 2-layer 64-wide Llama, a GPT-2 of the
same size, and calibration tokens. Random weights: every check here compares a variant with its own source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.eval import conftest as eval_fixtures

# The eval tests' session fixtures, shared rather than rebuilt (tokenizer training costs seconds).
tok = eval_fixtures.tok
model = eval_fixtures.model
model_dir = eval_fixtures.model_dir


def calibration_ids(tokenizer: Any) -> Any:
    """(8, 32) token ids from Python's help text, the kind of tokens the data stage packs."""
    from pydoc_data.topics import topics

    import numpy as np

    ids: list[int] = []
    for key in sorted(topics):
        ids += tokenizer(topics[key])["input_ids"]
        if len(ids) >= 8 * 32:
            break
    return np.asarray(ids[:8 * 32], dtype=np.int64).reshape(8, 32)


@pytest.fixture(scope="session")
def calib(tok: Any) -> Any:
    return calibration_ids(tok)


def gqa_llama(tok: Any, seed: int = 0) -> Any:
    """A tiny Llama with grouped-query attention (4 query heads over 2 KV heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(tok: Any, seed: int = 0) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(cfg).eval()


def save(model: Any, tok: Any, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
