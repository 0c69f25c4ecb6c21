"""Structured pruning: whole MLP channels and whole attention KV groups, the same count in every layer.

Importance is activation-aware (in the spirit of Wanda/FLAP, made structural): a channel's score is the
RMS of its activation on calibration tokens times the norm of the output weights it feeds, i.e. how much it
adds to the residual stream; a KV group's score sums its query heads' scores, measured the same way at the
input of `o_proj`. Every layer keeps the same widths, so the result is a smaller *standard* `transformers`
config (`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, an explicit `head_dim`): it loads
with `from_pretrained` and is faster on any hardware, with no mask and no special kernel.

Each family is pruned through its `Layout` (`LAYOUTS`, by `model_type`): where its MLP and attention keep
channels and heads (separate or fused projections, GPT-2's Conv1D) and what its q/k norms normalise over.
Qwen2's q/k/v biases are sliced with their rows; per-head norms (Qwen3, Gemma 3) stay valid as they are;
OLMo 2's norms over the whole projection are sliced and rescaled (below). Gemma's soft-capping, sliding
windows, `query_pre_attn_scalar` and embedding scale depend on no pruned width and are kept as they are.
A family not in `LAYOUTS`, and GPT-2's heads, are refused in one line before anything is built: a layout
that was not checked here could load and still compute something else.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llm.errors import ConfigError

KEY = "metadata.llm.compress.prune"


@dataclass(frozen=True)
class Layout:
    """Where one decoder family keeps what structured pruning slices (names relative to a block)."""

    blocks: str = "model.layers"
    mlp: str = "split"
    """`split`: `gate_proj` and `up_proj` rows; `fused`: `gate_up_proj` holds the gate rows, then the up rows
    (Phi-3); `conv1d`: GPT-2's `c_fc` / `c_proj` (weights stored (in, out))."""
    attn: str = "split"
    """`split`: `q_proj`, `k_proj`, `v_proj`; `fused`: `qkv_proj` holds q, then k, then v rows (Phi-3)."""
    qk_norm: str | None = None
    """`head`: q/k norms over one head's width (kept as is); `projection`: over all heads at once (OLMo 2)."""
    heads_refused: str | None = None
    """Why this family's heads cannot be pruned to a standard config (None: they can)."""

    @property
    def down(self) -> str:
        return "mlp.c_proj" if self.mlp == "conv1d" else "mlp.down_proj"


LAYOUTS: dict[str, Layout] = {
    "llama": Layout(), "mistral": Layout(), "qwen2": Layout(), "qwen3": Layout(qk_norm="head"),
    "gemma2": Layout(), "gemma3_text": Layout(qk_norm="head"), "phi3": Layout(mlp="fused", attn="fused"),
    "olmo2": Layout(qk_norm="projection"),
    "gpt2": Layout(blocks="transformer.h", mlp="conv1d",
                   heads_refused="its head width is n_embd / n_head, so fewer heads change the width"),
}


def check_prunable(config: Any, head_ratio: float) -> Layout:
    """The family's layout, or a one-line `ConfigError` naming the family and why it is not pruned.

    Cheap (a config object, no weights): a stage can call it before building anything.
    """
    family = getattr(config, "model_type", None) or type(config).__name__
    layout = LAYOUTS.get(family)
    if layout is None:
        raise ConfigError(f"{KEY}: {family} models are not pruned structurally here (known layouts: "
                          f"{', '.join(sorted(LAYOUTS))}); drop `pruned` from compress.variants")
    if head_ratio > 0 and layout.heads_refused:
        raise ConfigError(f"{KEY}.head_ratio: {family} heads cannot be pruned to a standard config "
                          f"({layout.heads_refused}); set head_ratio: 0")
    return layout


def _blocks(model: Any, layout: Layout) -> list[Any]:
    try:
        return list(model.get_submodule(layout.blocks))
    except AttributeError:
        raise ConfigError(f"{KEY}: {type(model).__name__} has no {layout.blocks} (not the "
                          f"{model.config.model_type} layout pruning expects)") from None


def _keep_count(total: int, ratio: float, multiple: int) -> int:
    """How many of `total` to keep after removing `ratio`, rounded to `multiple`, at least one unit."""
    keep = total * (1.0 - ratio)
    rounded = int(round(keep / multiple)) * multiple
    return min(total, max(multiple if multiple <= total else 1, rounded))


class _SquareSums:
    """Forward pre-hooks summing the squared inputs of given modules per feature over calibration tokens."""

    def __init__(self, modules: dict[str, Any]) -> None:
        self.sums: dict[str, Any] = {}
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
    """Per-layer scores: `mlp` (one per channel) and, where heads can be pruned, `groups` (one per KV group);
    for norms over the whole projection, `q_energy` / `k_energy` (summed squares per query / KV head).

    Args:
        model: the causal LM to score (eval mode, float).
        calib: (rows, seq_len) token ids; every token counts.
        batch_size: rows per forward pass.
    """
    import torch

    layout = check_prunable(model.config, 0.0)
    layers = _blocks(model, layout)
    heads = layout.heads_refused is None
    watched: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        watched[f"{i}.mlp"] = layer.get_submodule(layout.down)
        if heads:
            watched[f"{i}.attn"] = layer.self_attn.o_proj
        if layout.qk_norm == "projection":
            watched[f"{i}.q"], watched[f"{i}.k"] = layer.self_attn.q_norm, layer.self_attn.k_norm
    sums = _SquareSums(watched)
    rows = torch.as_tensor(calib, dtype=torch.long)
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                model(input_ids=rows[start:start + batch_size].to(next(model.parameters()).device), use_cache=False)
    finally:
        sums.remove()
    n_tokens = rows.numel()
    n_heads, n_kv, head_dim = _heads(model.config) if heads else (0, 0, 0)
    scores: dict[str, list[Any]] = {"mlp": [], "groups": [], "q_energy": [], "k_energy": []}
    for i, layer in enumerate(layers):
        rms = (sums.sums[f"{i}.mlp"] / n_tokens).sqrt()
        down = layer.get_submodule(layout.down).weight.detach().float()
        # Channel j feeds column j of a Linear (d, ff), row j of GPT-2's Conv1D (ff, d).
        out_norm = down.norm(dim=1) if layout.mlp == "conv1d" else down.norm(dim=0)
        scores["mlp"].append((rms * out_norm).cpu())
        if heads:
            scores["groups"].append(_group_scores(layer.self_attn, model.config, sums.sums[f"{i}.attn"] / n_tokens))
        if layout.qk_norm == "projection":
            scores["q_energy"].append(sums.sums[f"{i}.q"].reshape(n_heads, head_dim).sum(dim=1).cpu())
            scores["k_energy"].append(sums.sums[f"{i}.k"].reshape(n_kv, head_dim).sum(dim=1).cpu())
    return scores


def _heads(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head width) of a config with `num_attention_heads`."""
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


def _rows(indices: Any, width: int, offset: int = 0) -> Any:
    """Row indices of whole units `indices` of `width` rows each, starting at row `offset`."""
    import torch

    return torch.cat([torch.arange(offset + int(i) * width, offset + (int(i) + 1) * width) for i in indices])


def prune_model(model: Any, calib: Any, mlp_ratio: float, head_ratio: float = 0.0, multiple_of: int = 8) -> Any:
    """A smaller copy of `model` with uniform widths: the same channels and groups count kept in every layer.

    Args:
        model: a causal LM of a family in `LAYOUTS` (float, not modified).
        calib: (rows, seq_len) calibration token ids.
        mlp_ratio: fraction of MLP channels removed per layer.
        head_ratio: fraction of KV groups (with their query heads) removed per layer (not GPT-2).
        multiple_of: kept MLP width rounded to this.

    Returns:
        A new model built from the smaller config with the kept weights (`load_state_dict(strict=True)`).

    Raises:
        ConfigError: the family, or its heads, cannot be pruned structurally (one line, before any work).
    """
    from transformers import AutoModelForCausalLM

    layout = check_prunable(model.config, head_ratio)
    layers = _blocks(model, layout)
    model.eval()
    scores = importance(model, calib)
    config = copy.deepcopy(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ff = scores["mlp"][0].numel()
    k_mlp = _keep_count(ff, mlp_ratio, multiple_of)
    if layout.mlp == "conv1d":
        config.n_inner = k_mlp
    else:
        config.intermediate_size = k_mlp
    if layout.heads_refused is None:
        n_heads, n_kv, head_dim = _heads(model.config)
        k_kv = _keep_count(n_kv, head_ratio, 1)
        config.num_key_value_heads, config.num_attention_heads = k_kv, k_kv * (n_heads // n_kv)
        config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives the width
    for i in range(len(layers)):
        block = f"{layout.blocks}.{i}"
        _prune_mlp(state, f"{block}.mlp", layout, _top(scores["mlp"][i], k_mlp), ff)
        if layout.heads_refused is None:
            groups = _top(scores["groups"][i], k_kv)
            _prune_attention(state, f"{block}.self_attn", layout, groups, _heads(model.config),
                             {k: scores[k][i] for k in ("q_energy", "k_energy") if scores[k]})
    smaller = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    smaller.load_state_dict(state, strict=True)  # any shape the config disagrees with fails here
    if getattr(model, "generation_config", None) is not None:
        smaller.generation_config = copy.deepcopy(model.generation_config)
    return smaller.eval()


def _prune_mlp(state: dict[str, Any], p: str, layout: Layout, keep: Any, ff: int) -> None:
    """Keep MLP channels `keep` (of `ff`) in the block's weights under prefix `p`."""
    import torch

    if layout.mlp == "conv1d":
        _slice(state, [f"{p}.c_fc.weight"], 1, keep)  # Conv1D weights are (in, out)
        _slice(state, [f"{p}.c_fc.bias"], 0, keep, required=False)
        _slice(state, [f"{p}.c_proj.weight"], 0, keep)
        return
    if layout.mlp == "fused":  # [gate; up]: channel j is row j and row ff + j
        _slice(state, [f"{p}.gate_up_proj.weight"], 0, torch.cat([keep, keep + ff]))
        _slice(state, [f"{p}.gate_up_proj.bias"], 0, torch.cat([keep, keep + ff]), required=False)
    else:
        _slice(state, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"], 0, keep)
        _slice(state, [f"{p}.gate_proj.bias", f"{p}.up_proj.bias"], 0, keep, required=False)
    _slice(state, [f"{p}.down_proj.weight"], 1, keep)


def _prune_attention(state: dict[str, Any], a: str, layout: Layout, groups: Any, shape: tuple[int, int, int],
                     energy: dict[str, Any]) -> None:
    """Keep KV groups `groups` (and the query heads they serve) in the attention weights under prefix `a`."""
    import torch

    n_heads, n_kv, head_dim = shape
    rep = n_heads // n_kv
    q_heads = torch.as_tensor([g * rep + r for g in groups.tolist() for r in range(rep)])
    q_rows, kv_rows = _rows(q_heads, head_dim), _rows(groups, head_dim)
    if layout.attn == "fused":  # [q; k; v]: biases, where present, follow their rows
        q_width, kv_width = n_heads * head_dim, n_kv * head_dim
        rows = torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])
        _slice(state, [f"{a}.qkv_proj.weight"], 0, rows)
        _slice(state, [f"{a}.qkv_proj.bias"], 0, rows, required=False)
    else:
        _slice(state, [f"{a}.q_proj.weight"], 0, q_rows)
        _slice(state, [f"{a}.k_proj.weight", f"{a}.v_proj.weight"], 0, kv_rows)
        _slice(state, [f"{a}.q_proj.bias"], 0, q_rows, required=False)  # Qwen2: biases go with their rows
        _slice(state, [f"{a}.k_proj.bias", f"{a}.v_proj.bias"], 0, kv_rows, required=False)
    _slice(state, [f"{a}.o_proj.weight"], 1, q_rows)
    if layout.qk_norm == "projection":
        # An RMSNorm over all heads' widths divides by the RMS of every head; over the kept heads alone it
        # divides by theirs. Rescaling the kept weights by sqrt(kept mean square / all mean square) measured
        # on the calibration tokens keeps the normalised scale (exact when the removed heads were silent).
        _slice(state, [f"{a}.q_norm.weight"], 0, q_rows)
        _slice(state, [f"{a}.k_norm.weight"], 0, kv_rows)
        for name, kept in (("q", q_heads), ("k", groups)):
            e = energy[f"{name}_energy"]
            if len(kept) < len(e) and float(e.sum()) > 0:
                ratio = (e[kept].sum() / len(kept)) / (e.sum() / len(e))
                state[f"{a}.{name}_norm.weight"] *= ratio.sqrt().to(state[f"{a}.{name}_norm.weight"].dtype)


def _slice(state: dict[str, Any], keys: Iterable[str], dim: int, index: Any, required: bool = True) -> None:
    for key in keys:
        if key in state:
            state[key] = state[key].index_select(dim, index).contiguous()
        elif required:  # a layout the family was expected to have and does not: refuse, never guess
            raise ConfigError(f"{KEY}: {key} not found in the model's weights (not the layout pruning expects)")
