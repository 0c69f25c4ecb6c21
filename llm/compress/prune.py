"""Structured pruning: whole MLP channels and whole attention KV groups, the same count in every layer.

Importance is activation-aware (in the spirit of Wanda/FLAP, made structural): a channel's score is the
RMS of its activation on calibration tokens times the norm of the output weights it feeds, i.e. how much it
adds to the residual stream; a KV group's score sums its query heads' scores, measured the same way at the
input of `o_proj`. Every layer keeps the same widths, so the result is a smaller *standard* `transformers`
config (`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, an explicit `head_dim`): it loads
with `from_pretrained` and is faster on any hardware, with no mask and no special kernel.

Supported: Llama-style decoders (`gate/up/down_proj`, `q/k/v/o_proj`: Llama, Mistral, Qwen2, ...) for MLP
and heads; GPT-2 for MLP channels only (its config ties the head width to `n_embd / n_head`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from llm.errors import ConfigError


def _layers(model: Any) -> tuple[str, list[Any]]:
    """("llama" | "gpt2", the decoder blocks)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner.layers[0], "mlp") \
            and hasattr(inner.layers[0].mlp, "down_proj") and hasattr(inner.layers[0], "self_attn"):
        return "llama", list(inner.layers)
    body = getattr(model, "transformer", None)
    if body is not None and hasattr(body, "h") and hasattr(body.h[0].mlp, "c_proj"):
        return "gpt2", list(body.h)
    raise ConfigError(f"{type(model).__name__}: structured pruning supports Llama-style and GPT-2 decoders")


def _keep_count(total: int, ratio: float, multiple: int) -> int:
    """How many of `total` to keep after removing `ratio`, rounded to `multiple`, at least one unit."""
    keep = total * (1.0 - ratio)
    rounded = int(round(keep / multiple)) * multiple
    return min(total, max(multiple if multiple <= total else 1, rounded))


class _SquareSums:
    """Forward pre-hooks summing the squared inputs of given modules per feature over calibration tokens."""

    def __init__(self, modules: dict[str, Any]) -> None:
        self.sums: dict[str, Any] = {}
        self.tokens = 0
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sums[name] = self.sums.get(name, 0) + (x * x).sum(dim=0)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def importance(model: Any, calib: Any, batch_size: int = 8) -> dict[str, list[Any]]:
    """Per-layer scores: `mlp` (one per channel) and, for Llama-style models, `groups` (one per KV group).

    Args:
        model: the causal LM to score (eval mode, float).
        calib: (rows, seq_len) token ids; every token counts.
        batch_size: rows per forward pass.
    """
    import torch

    kind, layers = _layers(model)
    watched: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        watched[f"{i}.mlp"] = layer.mlp.down_proj if kind == "llama" else layer.mlp.c_proj
        if kind == "llama":
            watched[f"{i}.attn"] = layer.self_attn.o_proj
    sums = _SquareSums(watched)
    rows = torch.as_tensor(calib, dtype=torch.long)
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                model(input_ids=rows[start:start + batch_size].to(next(model.parameters()).device), use_cache=False)
    finally:
        sums.remove()
    n_tokens = rows.numel()
    scores: dict[str, list[Any]] = {"mlp": [], "groups": []}
    for i, layer in enumerate(layers):
        rms = (sums.sums[f"{i}.mlp"] / n_tokens).sqrt()
        if kind == "llama":
            out_norm = layer.mlp.down_proj.weight.detach().float().norm(dim=0)  # (d, ff): column j feeds channel j
        else:
            out_norm = layer.mlp.c_proj.weight.detach().float().norm(dim=1)  # Conv1D (ff, d): row j
        scores["mlp"].append((rms * out_norm).cpu())
        if kind == "llama":
            scores["groups"].append(_group_scores(layer.self_attn, model.config, sums.sums[f"{i}.attn"] / n_tokens))
    return scores


def _heads(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head width) of a Llama-style config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def _group_scores(attn: Any, config: Any, mean_sq: Any) -> Any:
    import torch

    n_heads, n_kv, head_dim = _heads(config)
    w = attn.o_proj.weight.detach().float()  # (d, n_heads * head_dim)
    per_head = [(mean_sq[h * head_dim:(h + 1) * head_dim].sum().sqrt()
                 * w[:, h * head_dim:(h + 1) * head_dim].norm()) for h in range(n_heads)]
    rep = n_heads // n_kv  # KV head g serves query heads g*rep ... g*rep+rep-1 (transformers' repeat_kv)
    return torch.stack([sum(per_head[g * rep:(g + 1) * rep]) for g in range(n_kv)]).cpu()


def _top(scores: Any, k: int) -> Any:
    """Indices of the `k` highest scores, in their original order (the layout of the rest is kept)."""
    return scores.topk(k).indices.sort().values


def _rows(indices: Any, width: int) -> Any:
    """Row indices of whole heads `indices` of `width` rows each."""
    import torch

    return torch.cat([torch.arange(int(i) * width, (int(i) + 1) * width) for i in indices])


def prune_model(model: Any, calib: Any, mlp_ratio: float, head_ratio: float = 0.0, multiple_of: int = 8) -> Any:
    """A smaller copy of `model` with uniform widths: the same channels and groups count kept in every layer.

    Args:
        model: a Llama-style or GPT-2 causal LM (float, not modified).
        calib: (rows, seq_len) calibration token ids.
        mlp_ratio: fraction of MLP channels removed per layer.
        head_ratio: fraction of KV groups (with their query heads) removed per layer; Llama-style only.
        multiple_of: kept MLP width rounded to this.

    Returns:
        A new model built from the smaller config with the kept weights (`load_state_dict(strict=True)`).
    """
    from transformers import AutoModelForCausalLM

    kind, layers = _layers(model)
    if kind == "gpt2" and head_ratio > 0:
        raise ConfigError("metadata.llm.compress.prune.head_ratio: GPT-2 heads cannot be pruned to a standard "
                          "config (head width is n_embd / n_head); set head_ratio: 0")
    model.eval()
    scores = importance(model, calib)
    config = copy.deepcopy(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ff = scores["mlp"][0].numel()
    k_mlp = _keep_count(ff, mlp_ratio, multiple_of)
    if kind == "llama":
        config.intermediate_size = k_mlp
        n_heads, n_kv, head_dim = _heads(model.config)
        k_kv = _keep_count(n_kv, head_ratio, 1)
        config.num_key_value_heads, config.num_attention_heads = k_kv, k_kv * (n_heads // n_kv)
        config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives the width
    else:
        config.n_inner = k_mlp
    prefix = "model.layers" if kind == "llama" else "transformer.h"
    for i in range(len(layers)):
        keep = _top(scores["mlp"][i], k_mlp)
        p = f"{prefix}.{i}.mlp"
        if kind == "llama":
            _slice(state, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.gate_proj.bias", f"{p}.up_proj.bias"],
                   0, keep)
            _slice(state, [f"{p}.down_proj.weight"], 1, keep)
            groups = _top(scores["groups"][i], k_kv)
            rep = n_heads // n_kv
            q_heads = [g * rep + r for g in groups.tolist() for r in range(rep)]
            a = f"{prefix}.{i}.self_attn"
            _slice(state, [f"{a}.q_proj.weight", f"{a}.q_proj.bias"], 0, _rows(q_heads, head_dim))
            _slice(state, [f"{a}.k_proj.weight", f"{a}.k_proj.bias", f"{a}.v_proj.weight", f"{a}.v_proj.bias"], 0,
                   _rows(groups, head_dim))
            _slice(state, [f"{a}.o_proj.weight"], 1, _rows(q_heads, head_dim))
        else:
            _slice(state, [f"{p}.c_fc.weight"], 1, keep)  # Conv1D weights are (in, out)
            _slice(state, [f"{p}.c_fc.bias"], 0, keep)
            _slice(state, [f"{p}.c_proj.weight"], 0, keep)
    smaller = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    smaller.load_state_dict(state, strict=True)  # any shape the config disagrees with fails here
    if getattr(model, "generation_config", None) is not None:
        smaller.generation_config = copy.deepcopy(model.generation_config)
    return smaller.eval()


def _slice(state: dict[str, Any], keys: Iterable[str], dim: int, index: Any) -> None:
    for key in keys:
        if key in state:
            state[key] = state[key].index_select(dim, index).contiguous()
