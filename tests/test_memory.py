"""Memory per GPU: DeepSpeed's model-state arithmetic, activations against autograd's saved tensors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llm.config import ModelConfig
from llm.memory import MemorySetting, ModelShape, activation_bytes, model_states_bytes, smallest_fit
from llm.plan import model_shape


def test_model_states_are_deepspeeds_arithmetic() -> None:
    """ZeRO-2/3 through DeepSpeed's estimators, checked against their documented multipliers by hand."""
    p, largest = 1_000_000_000, 100_000_000
    assert model_states_bytes(p, largest, MemorySetting(0), 8, 2)[0] == 20 * p  # nothing partitioned
    assert model_states_bytes(p, largest, MemorySetting(2), 8, 2)[0] == 2 * p + 18 * p // 16
    assert model_states_bytes(p, largest, MemorySetting(1), 8, 2)[0] == 2 * p + 18 * p // 16 + int(2 * p * 15 / 16)
    assert model_states_bytes(p, largest, MemorySetting(2, offload_optimizer=True), 8, 2)[0] == 2 * p
    assert model_states_bytes(p, largest, MemorySetting(3), 8, 2)[0] == 4 * largest + 18 * p // 16
    assert model_states_bytes(p, largest, MemorySetting(3, True, True), 8, 2)[0] == 4 * largest


def test_activation_bytes_by_hand() -> None:
    shape = ModelShape(total=1, trainable=1, largest_layer=1, n_layers=12, d_model=768, vocab=32768, ff=2048)
    tokens = 16 * 1024
    block, logits = tokens * (24 * 768 + 8 * 2048), tokens * 32768 * 8
    head = tokens * 768 * 6  # the final norm's fp32 input and the output head's 16-bit input
    assert activation_bytes(shape, 16, 1024, False) == 12 * block + head + logits
    assert activation_bytes(shape, 16, 1024, True) == 12 * 2 * tokens * 768 + block + head + logits


def _saved_bytes(m: ModelConfig, vocab: int, batch: int, seq: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward after one bf16 forward of a Hugging Face model (weights excluded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.train.model import hf_config

    model = AutoModelForCausalLM.from_config(hf_config(m, vocab), dtype=torch.bfloat16, attn_implementation="sdpa")
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, vocab, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in seen.items() if ptr not in weights)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_match_saved_tensors(arch: str, checkpointing: bool) -> None:
    """The estimate is what autograd really keeps (plus the logits' fp32 gradient, and with checkpointing the
    block being recomputed, neither of which exists yet after the forward pass), within 5%."""
    m = ModelConfig(arch=arch, n_layers=3, d_model=128, n_heads=4, context=256, d_ff=384)
    vocab, batch, seq = 2048, 2, 256
    shape = model_shape(m, vocab)
    est = activation_bytes(shape, batch, seq, checkpointing) - 4 * batch * seq * vocab
    if checkpointing:
        one_block = replace(shape, n_layers=1)
        est -= activation_bytes(one_block, batch, seq, False) - activation_bytes(replace(one_block, n_layers=0),
                                                                                batch, seq, False)
    assert est == pytest.approx(_saved_bytes(m, vocab, batch, seq, checkpointing), rel=0.05)


def test_smallest_fit_is_cheapest_and_fits() -> None:
    from llm.memory import gpu_memory

    shape = model_shape(ModelConfig(n_layers=32, d_model=4096, n_heads=32, context=1024), 32768)
    cur = MemorySetting(2, micro_batch_size=16)
    cap = 72 * 2**30
    assert gpu_memory(shape, cur, 1024, 8, 2).total > cap
    change = smallest_fit(shape, cur, 1024, 8, 2, cap)
    assert change == {"micro_batch_size": 8, "grad_accum_factor": 2}
    assert gpu_memory(shape, MemorySetting(2, micro_batch_size=8), 1024, 8, 2).total <= cap
