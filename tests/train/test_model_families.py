"""`pretrain.model` builds any family through its own `transformers` config class (`type: qwen3` plus its
fields, or a local `config.json`), and the older `arch: llama | gpt2` still builds what it did."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from llm.config import ModelConfig
from llm.config.train import FAMILIES
from llm.errors import ConfigError
from llm.train.model import build_model, hf_config
from tests.conftest import tiny_config
from tests.models import conftest as model_fixtures

zoo = model_fixtures.zoo
VOCAB = 320
# What the family's own layout looks like once built (the config class brought it, not a Llama in disguise).
MARK: dict[str, Callable[[Any], bool]] = {
    "llama": lambda m: m.model.layers[0].self_attn.k_proj.out_features == 32,
    "mistral": lambda m: m.model.layers[0].self_attn.k_proj.out_features == 32,
    "qwen2": lambda m: m.model.layers[0].self_attn.q_proj.bias is not None,
    "qwen3": lambda m: tuple(m.model.layers[0].self_attn.q_norm.weight.shape) == (16,),
    "gemma2": lambda m: m.config.final_logit_softcapping is not None and m.config.query_pre_attn_scalar == 16,
    "gemma3": lambda m: m.config.model_type == "gemma3_text" and m.config.head_dim == 16,
    "phi3": lambda m: m.model.layers[0].mlp.gate_up_proj.out_features == 2 * 64,
    "olmo2": lambda m: tuple(m.model.layers[0].self_attn.q_norm.weight.shape) == (64,),
    "gpt2": lambda m: m.config.n_inner == 64 and m.config.n_embd == 64,
}


def _spec(family: str, **extra: Any) -> ModelConfig:
    kv = None if family == "gpt2" else 2
    return ModelConfig(type=family, n_layers=2, d_model=64, n_heads=4, n_kv_heads=kv, d_ff=64, context=32, **extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_and_trains_one_step(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build_model(_spec(family), VOCAB, seed=0)
    assert MARK[family](model), f"{family}: not the family's own layout"
    assert model.config.vocab_size == VOCAB and model.config.pad_token_id is None  # Phi-3's default 32000 is not
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - float(torch.log(torch.tensor(VOCAB)))) < 1.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)) is type(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_arch_still_builds_what_it_did(arch: str) -> None:
    """`arch:` configs keep their exact model: the same config fields as before `type` existed."""
    m = ModelConfig(arch=arch, n_layers=2, d_model=64, n_heads=4, context=32)
    got = hf_config(m, VOCAB).to_diff_dict()
    if arch == "gpt2":
        assert (got["model_type"], got["n_embd"], got["n_inner"], got["n_positions"]) == ("gpt2", 64, 256, 32)
        assert "hidden_size" not in got
    else:
        assert (got["model_type"], got["hidden_size"], got["intermediate_size"], got["head_dim"]) == \
            ("llama", 64, 192, 16)
    assert m.family == arch and ModelConfig(type=arch).family == arch


def test_family_fields_pass_through_and_unknown_ones_are_named() -> None:
    cfg = hf_config(_spec("qwen3", config={"head_dim": 32, "rope_theta": 5000.0, "attention_bias": True}), VOCAB)
    assert (cfg.head_dim, cfg.rope_parameters["rope_theta"], cfg.attention_bias) == (32, 5000.0, True)
    gemma = hf_config(_spec("gemma2", config={"head_dim": 32}), VOCAB)
    assert gemma.query_pre_attn_scalar == 32  # Gemma scales queries by its head width unless told otherwise
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.pretrain\.model\.config\.bogus: not a field of "
                                          r"Qwen3Config \(qwen3\)$"):
        hf_config(_spec("qwen3", config={"bogus": 1}), VOCAB)
    with pytest.raises(ValueError, match=r"config\.hidden_size: set by the shape field `d_model`"):
        _spec("qwen3", config={"hidden_size": 128})
    assert ModelConfig(type="qwen2", arch="gpt2").family == "qwen2"  # type wins over the older spelling


def test_a_local_config_json_is_built_with_fresh_weights_and_the_tokenizers_vocabulary(
        zoo: Callable[[str], Path], tmp_path: Path) -> None:
    src = zoo("phi3")
    shipped = json.loads((src / "config.json").read_text())
    model = build_model(ModelConfig(config_file=str(src / "config.json"), config={"num_hidden_layers": 1}), VOCAB,
                        seed=0)
    assert type(model).__name__ == "Phi3ForCausalLM" and model.config.vocab_size == VOCAB != shipped["vocab_size"]
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == shipped["hidden_size"]
    assert model.config.tie_word_embeddings is False  # the file's, not the shape fields' default
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**shipped, "model_type": "gpt_neox"}))
    with pytest.raises(ConfigError, match=r"config_file: model_type 'gpt_neox' is not a family built here"):
        hf_config(ModelConfig(config_file=str(tmp_path)), VOCAB)
    with pytest.raises(ConfigError, match=r"pretrain\.model\.type: qwen2 disagrees with"):
        hf_config(ModelConfig(type="qwen2", config_file=str(src)), VOCAB)
    with pytest.raises(ConfigError, match=r"config_file: cannot read .*absent"):
        hf_config(ModelConfig(config_file=str(tmp_path / "absent.json")), VOCAB)


def test_pretrain_config_with_type_qwen2_validates_sizes_and_plans(tmp_path: Path) -> None:
    from llm.plan import build_plan
    from llm.sizing import derive
    from llm.train.pretrain import model_section

    loaded = tiny_config(tmp_path, "pretrain.model.type=qwen2", "pretrain.model.n_kv_heads=2")
    assert loaded.llm.pretrain.model.family == "qwen2"
    assert derive(loaded).pretrain.workers >= 0
    pre = next(m for m in build_plan(loaded)["memory"] if m["stage"] == "pretrain")
    assert pre["params"] > 0
    assert model_section(loaded.llm).type == "qwen2"  # the driver's check builds the family's config once
    bad = tiny_config(tmp_path, "pretrain.model.type=qwen2", "pretrain.model.config={bogus: 1}")
    with pytest.raises(ConfigError, match=r"pretrain\.model\.config\.bogus"):
        model_section(bad.llm)
    gpt2 = build_plan(tiny_config(tmp_path, "pretrain.model.type=gpt2"))
    assert next(m for m in gpt2["memory"] if m["stage"] == "pretrain")["params"] != pre["params"]


def test_plan_sizes_a_config_file_like_its_directory(zoo: Callable[[str], Path], tmp_path: Path) -> None:
    from llm.plan import dir_shape
    from llm.train.pretrain import model_section

    src = zoo("qwen3")
    assert dir_shape(str(src / "config.json")) == dir_shape(str(src))
    loaded = tiny_config(tmp_path, f"pretrain.model.config_file={src / 'config.json'}")
    assert Path(str(model_section(loaded.llm).config_file)).is_absolute()
