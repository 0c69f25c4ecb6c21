"""Structured pruning of every zoo family: exact where nothing that matters is removed, standard configs that
load and generate, and a one-line refusal where a layout cannot be pruned.

The checks that can catch a wrong slice: channels and KV groups are silenced first (their output weights
zeroed), so importance ranks them last and removing them must leave the logits as they were. A slice that
took the wrong rows (Phi-3's fused `gate_up_proj` / `qkv_proj`, Qwen2's biases, OLMo 2's whole-projection
q/k norms) changes the logits. The groups silenced are not the last ones, so keeping "the first k" fails too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llm.compress.prune import LAYOUTS, Layout, check_prunable, prune_model
from llm.errors import ConfigError
from tests.models import conftest as model_fixtures
from tests.models.zoo import FAMILIES

zoo = model_fixtures.zoo
# Longer than the zoo Gemmas' sliding window (32): the windowed layers see a cut.
CALIB = np.random.RandomState(0).randint(0, 400, size=(4, 40)).astype(np.int64)
HEAD_FAMILIES = sorted(f for f in FAMILIES if LAYOUTS[FAMILIES[f].model_type].heads_refused is None)


def _load(zoo: Callable[[str], Path], name: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(zoo(name)), local_files_only=True, dtype=torch.float32).eval()


def _logits(model: Any) -> Any:
    with torch.inference_mode():
        return model(input_ids=torch.as_tensor(CALIB)).logits


def _greedy(model: Any, new: int = 6) -> Any:
    ids = torch.as_tensor(CALIB[:1])
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False)


def _ff(config: Any) -> int:
    if config.model_type == "gpt2":
        return int(config.n_inner or 4 * config.n_embd)
    return int(config.intermediate_size)


def _silence(model: Any, layout: Layout, channels: Any, groups: list[int]) -> None:
    """Zero what MLP `channels` and KV `groups` add to the residual stream (and, so that a norm over the whole
    projection sees nothing from them either, their query and key rows)."""
    cfg = model.config
    with torch.no_grad():
        for block in model.get_submodule(layout.blocks):
            if layout.mlp == "conv1d":
                block.mlp.c_proj.weight[channels, :] = 0  # Conv1D (ff, d): row j is channel j
            else:
                block.mlp.down_proj.weight[:, channels] = 0
            if not groups:
                continue
            n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
            hd, rep = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // n_heads, n_heads // n_kv
            attn = block.self_attn
            for g in groups:
                q = slice(g * rep * hd, (g + 1) * rep * hd)
                k = slice(g * hd, (g + 1) * hd)
                attn.o_proj.weight[:, q] = 0
                if layout.attn == "fused":
                    attn.qkv_proj.weight[q] = 0
                    attn.qkv_proj.weight[n_heads * hd:][k] = 0
                else:
                    attn.q_proj.weight[q] = 0
                    attn.k_proj.weight[k] = 0


def _loud_qk(model: Any) -> None:
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight *= 100
            block.self_attn.k_proj.weight *= 100


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_keeping_everything_gives_identical_logits(zoo: Callable[[str], Path], name: str) -> None:
    model = _load(zoo, name)
    same = prune_model(model, CALIB, mlp_ratio=0.0, head_ratio=0.0)
    assert type(same) is type(model) and _ff(same.config) == _ff(model.config)
    assert torch.equal(_logits(same), _logits(model))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_silenced_channels_and_groups_pruned_leave_logits_and_generation_unchanged(
        zoo: Callable[[str], Path], name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _load(zoo, name)
    layout = LAYOUTS[model.config.model_type]
    ff = _ff(model.config)
    channels = torch.randperm(ff, generator=torch.Generator().manual_seed(1))[: ff // 2]
    n_kv = getattr(model.config, "num_key_value_heads", 1) if layout.heads_refused is None else 1
    groups = list(range(0, n_kv, 2))[: n_kv // 2]  # group 0 goes: "keep the first k" would be wrong
    if layout.qk_norm == "projection":  # random init leaves q, k ~3e-3, where the norm's eps (1e-6) is a tenth
        _loud_qk(model)                 # of their mean square; trained ones are far larger
    _silence(model, layout, channels, groups)
    small = prune_model(model, CALIB, mlp_ratio=0.5, head_ratio=0.5 if groups else 0.0, multiple_of=1)
    assert _ff(small.config) == ff // 2
    if groups:
        assert small.config.num_key_value_heads == n_kv - len(groups)
        assert small.num_parameters() < model.num_parameters()
    torch.testing.assert_close(_logits(small), _logits(model), rtol=0, atol=1e-4)
    small.save_pretrained(tmp_path)  # a standard config: the Auto class loads it and it generates
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert type(again) is type(model) and again.config.model_type == model.config.model_type
    assert torch.equal(_greedy(again), _greedy(model))


def test_olmo2_norm_over_all_heads_is_sliced_and_rescaled(zoo: Callable[[str], Path]) -> None:
    """OLMo 2 normalises q (and k) over every head at once: keeping half the heads halves the mean square,
    so the kept norm weights carry sqrt(2) when the removed heads were silent (not merely a slice)."""
    model = _load(zoo, "olmo2")
    _loud_qk(model)
    _silence(model, LAYOUTS["olmo2"], torch.tensor([], dtype=torch.long), [0, 2])
    small = prune_model(model, CALIB, mlp_ratio=0.0, head_ratio=0.5)
    kept = torch.cat([torch.arange(16, 32), torch.arange(48, 64)])  # heads 1 and 3, 16 wide
    for name in ("q_norm", "k_norm"):
        before = getattr(model.model.layers[1].self_attn, name).weight
        after = getattr(small.model.layers[1].self_attn, name).weight
        assert after.shape == (32,)
        torch.testing.assert_close(after, before[kept] * 2 ** 0.5)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_pruned_gemma_keeps_capping_windows_and_scale_and_generates_as_its_reference(
        zoo: Callable[[str], Path], name: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _load(zoo, name)
    small = prune_model(model, CALIB, mlp_ratio=0.5, head_ratio=0.5, multiple_of=8)
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    kept = ("sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
            "final_logit_softcapping", "hidden_size", "head_dim", "rope_parameters")
    assert {k: getattr(again.config, k) for k in kept} == {k: getattr(model.config, k) for k in kept}
    assert again.config.intermediate_size == model.config.intermediate_size // 2
    scale = again.model.embed_tokens.embed_scale
    assert float(scale) == pytest.approx(model.config.hidden_size ** 0.5)
    # The reference: a model built from the pruned config.json with the pruned weights copied in.
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tmp_path)), dtype=torch.float32)
    reference.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(_greedy(again.eval(), new=8), _greedy(reference.eval(), new=8))
    assert torch.equal(_logits(again), _logits(small))


def test_gpt2_heads_refused_in_one_line(zoo: Callable[[str], Path]) -> None:
    model = _load(zoo, "gpt2")
    with pytest.raises(ConfigError, match=r"head_ratio: gpt2 heads cannot be pruned .*n_embd / n_head") as err:
        prune_model(model, CALIB, mlp_ratio=0.5, head_ratio=0.5)
    assert "\n" not in str(err.value)


def test_an_unknown_family_is_refused_in_one_line_before_any_work() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64)
    with pytest.raises(ConfigError, match=r"compress\.prune: gpt_neox models are not pruned structurally") as err:
        check_prunable(config, 0.0)
    assert "\n" not in str(err.value) and "olmo2" in str(err.value)
    with pytest.raises(ConfigError, match="gpt_neox"):
        prune_model(GPTNeoXForCausalLM(config).eval(), CALIB % 64, mlp_ratio=0.5)
