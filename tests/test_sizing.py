"""Sizing from node types, and the FLOPs arithmetic behind `plan`."""

from __future__ import annotations

import pytest

from llm.config import ModelConfig
from llm.hardware import gpu_model_of_instance, gpu_peak_flops
from llm.loading import load_config
from llm.plan import flops_per_token, param_counts
from llm.sizing import derive

from .conftest import ROOT


def test_gpu_cluster_sizing() -> None:
    s = derive(load_config(ROOT / "cluster" / "config.yaml"))
    assert (s.cluster_gpus, s.cluster_cpus) == (16, 8 + 2 * 192)
    assert s.pretrain.workers == 16 and s.pretrain.use_gpu
    assert s.pretrain.cpus_per_worker == 12  # 192 / 8 = 24 CPUs per GPU, half to the worker
    assert s.sweep_concurrent_trials == 16 and s.sweep_trial.workers == 1
    assert (s.serve_min_replicas, s.serve_max_replicas) == (1, 4)
    assert s.pretrain.scaling_config_kwargs() == {
        "num_workers": 16, "use_gpu": True, "resources_per_worker": {"CPU": 12.0, "GPU": 1},
        "placement_strategy": "PACK"}


def test_stage_overrides_win() -> None:
    s = derive(load_config(ROOT / "cluster" / "config.yaml", [
        "pretrain.sizing.workers=8", "pretrain.global_batch_size=512", "data.parallelism=7",
        "pretrain.sizing.placement_strategy=STRICT_SPREAD"]))
    assert s.pretrain.workers == 8 and s.data_parallelism == 7
    assert s.pretrain.scaling_config_kwargs()["placement_strategy"] == "STRICT_SPREAD"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_param_count_matches_transformers(arch: str) -> None:
    import transformers

    from llm.plan import param_counts

    m = ModelConfig(arch=arch, n_layers=2, d_model=64, n_heads=4, context=128)
    if arch == "llama":
        hf = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=m.ff_width(),
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    else:
        hf = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    model = transformers.AutoModelForCausalLM.from_config(hf)
    assert param_counts(m, 1000)["total"] == sum(p.numel() for p in model.parameters())


def test_flops_per_token_formula() -> None:
    m = ModelConfig(n_layers=12, d_model=768, n_heads=12, context=1024)
    n = param_counts(m, 32768)["compute"]
    assert flops_per_token(m, 32768, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_hardware_tables() -> None:
    assert gpu_model_of_instance("p5.48xlarge") == "H100"
    assert gpu_model_of_instance("p5en.48xlarge") == "H200"
    assert gpu_model_of_instance("m6i.2xlarge") is None
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("Some CPU") is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trainable_count_matches_peft(arch: str) -> None:
    import transformers
    from peft import LoraConfig, get_peft_model

    from llm.plan import model_shape
    from llm.train.lora import default_targets
    from llm.train.model import hf_config

    m = ModelConfig(arch=arch, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2 if arch == "llama" else None,
                    context=128)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(m, 1000))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=default_targets(model),
                                                  fan_in_fan_out=arch == "gpt2"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert model_shape(m, 1000, lora_rank=4).trainable == trainable


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"])
def test_plan_counts_every_family_as_transformers_builds_it(family: str) -> None:
    """`llmray plan` sizes `pretrain.model.type: <family>` exactly: total parameters (biases, per-head and
    whole-projection norms, Gemma's four norms per block) and LoRA's trainable count (Phi-3's fused layers)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from llm.plan import model_shape
    from llm.train.lora import default_targets
    from llm.train.model import hf_config

    extra = {"config": {"head_dim": 24}} if family == "gemma2" else {}  # a head_dim other than d_model / heads
    m = ModelConfig(type=family, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, context=128, **extra)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(m, 1000))
    assert param_counts(m, 1000)["total"] == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=default_targets(model)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert model_shape(m, 1000, lora_rank=4).trainable == trainable
