"""The zoo: every family's directory loads with the Auto classes, generates, and keeps the layout it claims."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.models.zoo import FAMILIES

PROMPT = [{"role": "user", "content": "What is a tuple?"}]


def _load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_loads_and_generates(zoo: Callable[[str], Path], name: str) -> None:
    import torch

    family = FAMILIES[name]
    model, tok = _load(zoo(name))
    assert model.config.model_type == family.model_type
    assert 50_000 < model.num_parameters() < 500_000
    assert model.config.vocab_size % family.vocab_multiple == 0 and model.config.vocab_size >= len(tok)
    assert tok.eos_token == family.eos and tok.bos_token == family.bos and tok.pad_token == family.pad
    if family.template:
        text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
        assert "What is a tuple?" in text
    else:
        assert not tok.chat_template
        text = PROMPT[0]["content"]
    ids = torch.as_tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    shipped = model.generation_config.eos_token_id
    assert tok.convert_ids_to_tokens(shipped if isinstance(shipped, list) else [shipped]) == list(family.generation_eos)


def _tied(model: Any) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


LAYOUT: dict[str, Callable[[Any], bool]] = {
    "llama": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads
    and m.model.layers[0].self_attn.k_proj.out_features == 2 * 16 and m.config.rope_parameters["rope_type"] == "llama3",
    "qwen2": lambda m: m.model.layers[0].self_attn.q_proj.bias is not None and _tied(m)
    and m.model.layers[0].self_attn.o_proj.bias is None,
    "qwen3": lambda m: tuple(m.model.layers[0].self_attn.q_norm.weight.shape) == (16,) and _tied(m)
    and m.model.layers[0].self_attn.q_proj.bias is None,
    "mistral": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads and not _tied(m),
    "gemma2": lambda m: m.config.attn_logit_softcapping == 50.0 and m.config.final_logit_softcapping == 30.0
    and "sliding_attention" in m.config.layer_types and _tied(m),
    "gemma3": lambda m: tuple(m.model.layers[0].self_attn.q_norm.weight.shape) == (16,)
    and m.config.layer_types == ["sliding_attention", "full_attention"],
    "phi3": lambda m: m.model.layers[0].self_attn.qkv_proj.out_features == 3 * 64
    and m.model.layers[0].mlp.gate_up_proj.out_features == 2 * 192 and not _tied(m),
    "olmo2": lambda m: tuple(m.model.layers[0].self_attn.q_norm.weight.shape) == (64,)
    and hasattr(m.model.layers[0], "post_feedforward_layernorm"),
    "gpt2": lambda m: type(m.transformer.h[0].attn.c_attn).__name__ == "Conv1D" and _tied(m),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_keeps_its_real_layout(zoo: Callable[[str], Path], name: str) -> None:
    model, _ = _load(zoo(name))
    assert LAYOUT[name](model)


def test_every_family_has_a_layout_check() -> None:
    assert set(LAYOUT) == set(FAMILIES)
