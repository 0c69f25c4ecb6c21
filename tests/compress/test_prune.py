"""Structured pruning: smaller standard configs whose weights agree, chosen by activation-aware importance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llm.compress.prune import importance, prune_model
from llm.compress.variants import build_pruned
from llm.errors import ConfigError
from llm.eval import param_count
from tests.compress.conftest import gqa_llama, save, tiny_gpt2


def test_pruned_llama_config_and_weights_agree_and_load(tmp_path: Path, tok: Any, calib: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = gqa_llama(tok)
    small = prune_model(model, calib, mlp_ratio=0.5, head_ratio=0.5)
    cfg = small.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 1, 16)
    layer = small.model.layers[1]
    assert layer.mlp.gate_proj.weight.shape == (64, 64) and layer.mlp.down_proj.weight.shape == (64, 64)
    assert layer.self_attn.q_proj.weight.shape == (32, 64) and layer.self_attn.k_proj.weight.shape == (16, 64)
    assert layer.self_attn.o_proj.weight.shape == (64, 32)
    assert param_count(small) < param_count(model)
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.as_tensor(calib[:2])
    with torch.inference_mode():
        assert torch.equal(again(input_ids=ids).logits, small(input_ids=ids).logits)


def test_pruned_variant_folder_stops_at_the_templates_end_of_turn(tmp_path: Path, tok: Any, calib: Any) -> None:
    from transformers import GenerationConfig

    src = save(gqa_llama(tok), tok, tmp_path / "fp32")
    out = build_pruned(src, tmp_path / "pruned", calib, mlp_ratio=0.5, head_ratio=0.5, multiple=8)
    assert GenerationConfig.from_pretrained(src).eos_token_id == tok.eos_token_id
    end = tok.convert_tokens_to_ids("<|end|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == sorted({tok.eos_token_id, end})


def test_nothing_removed_gives_the_same_model(tok: Any, calib: Any) -> None:
    model = gqa_llama(tok)
    same = prune_model(model, calib, mlp_ratio=0.0, head_ratio=0.0)
    ids = torch.as_tensor(calib[:2])
    with torch.inference_mode():
        assert torch.allclose(same(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_importance_follows_activations_not_index(tok: Any, calib: Any) -> None:
    """A channel whose output weights are scaled up ranks first; one whose input weights are zeroed (so its
    activation is 0 on every token) ranks last and is the one removed."""
    model = gqa_llama(tok)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 5] *= 50
        mlp.up_proj.weight[9].zero_()
    scores = importance(model, calib)["mlp"][0]
    assert int(scores.argmax()) == 5 and float(scores[9]) == 0.0
    small = prune_model(model, calib, mlp_ratio=1 / 128, multiple_of=1)  # remove exactly one channel
    assert small.config.intermediate_size == 127
    kept_up = small.model.layers[0].mlp.up_proj.weight
    assert not any(torch.equal(kept_up[i], mlp.up_proj.weight[9]) for i in range(127))


def test_head_groups_ranked_by_attention_output(tok: Any, calib: Any) -> None:
    model = gqa_llama(tok)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # KV group 0 serves query heads 0 and 1 (columns 0..31 of o_proj)
        attn.o_proj.weight[:, :32] *= 0.0
    groups = importance(model, calib)["groups"][0]
    assert groups.shape == (2,) and float(groups[0]) == 0.0 < float(groups[1])
    small = prune_model(model, calib, mlp_ratio=0.0, head_ratio=0.5)
    assert torch.equal(small.model.layers[0].self_attn.k_proj.weight, attn.k_proj.weight[16:32])


def test_gpt2_mlp_pruned_heads_refused(tmp_path: Path, tok: Any, calib: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2(tok)
    small = prune_model(model, calib, mlp_ratio=0.5)
    assert small.config.n_inner == 128 and small.transformer.h[0].mlp.c_fc.weight.shape == (64, 128)
    small.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).config.n_inner == 128
    with pytest.raises(ConfigError, match="head_ratio"):
        prune_model(model, calib, mlp_ratio=0.5, head_ratio=0.5)
