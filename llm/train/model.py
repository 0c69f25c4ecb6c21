"""Building a Hugging Face causal LM from `ModelConfig`, or loading one from a local directory.

Nothing is downloaded: a model is either built from a `transformers` config object made here, or read
from a directory that `from_pretrained` loads with `local_files_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.config import ModelConfig
from llm.errors import ConfigError
from llm.flops import training_flops_per_token


def hf_config(model: ModelConfig, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None) -> Any:
    """The `transformers` config object a `ModelConfig` describes."""
    from transformers import GPT2Config, LlamaConfig

    ids: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if model.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=model.context, n_embd=model.d_model, n_layer=model.n_layers,
            n_head=model.n_heads, n_inner=model.ff_width(), resid_pdrop=model.dropout, embd_pdrop=model.dropout,
            attn_pdrop=model.dropout, tie_word_embeddings=model.tie_embeddings, use_cache=False, **ids,
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=model.d_model, intermediate_size=model.ff_width(),
        num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_kv_heads or model.n_heads, max_position_embeddings=model.context,
        attention_dropout=model.dropout, tie_word_embeddings=model.tie_embeddings, use_cache=False, **ids,
    )


def check_model_dir(path: str, key: str) -> Path:
    """`path` as an absolute Hugging Face model directory (config and weights), else a one-line error naming
    `key`. Run on the driver: a worker's cwd differs, and its failure would cost a cluster start to find."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a directory")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {folder} has no config.json (not a Hugging Face model directory)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(f"{key}: {folder} has no weights (*.safetensors or *.bin)")
    return folder


def build_model(model: ModelConfig, vocab_size: int, seed: int, tokenizer: Any = None) -> Any:
    """A freshly initialised causal LM (same seed, same weights on every rank), or a local one.

    Args:
        model: the typed model section; `path` loads instead of building.
        vocab_size: vocabulary of the data stage's tokenizer.
        seed: init seed.
        tokenizer: supplies bos/eos/pad ids for the saved generation config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if model.path is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(model.path, local_files_only=True, dtype=torch.float32)
        except OSError as e:
            raise ConfigError(f"metadata.llm.pretrain.model.path: cannot load {model.path!r}: {e}") from None
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(model, vocab_size, **ids), dtype=torch.float32)


def flops_per_token(hf_model: Any, seq_len: int) -> float:
    """Training FLOPs per token of a loaded model (`llm.flops.training_flops_per_token` from its shapes).

    N counts every matmul weight, the output projection included even when tied, and no embedding or
    position lookups: for models built from a `ModelConfig` the same figure as `llm.plan.flops_per_token`.
    """
    embed = hf_model.get_input_embeddings().weight
    out = hf_model.get_output_embeddings()
    positions = [m.weight for name, m in hf_model.named_modules() if name.endswith(("wpe", "position_embeddings"))]
    skip = {id(embed), *(id(p) for p in positions)}
    n = sum(p.numel() for p in hf_model.parameters() if id(p) not in skip and p.dim() >= 2)
    if out is not None and id(out.weight) == id(embed):
        n += embed.numel()  # tied: the output projection still costs a matmul
    cfg = hf_model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return training_flops_per_token(n, layers, width, seq_len)
