"""Greedy generation on held-out prompts, batched with left padding, scored against references.

Decoding is fixed here rather than taken from each model's `generation_config` (which may carry a
temperature or a repetition penalty): every model compared is decoded the same way, greedily, for at
most the same number of new tokens, and stops where serving stops (`llm.models.stops.stop_token_ids`: its
eos ids and the chat template's end-of-turn token), so the scores describe what the endpoint returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm.errors import DataError
from llm.eval.data import PromptPair
from llm.eval.loss import model_device
from llm.eval.text import text_metrics
from llm.eval.turns import fit_roles
from llm.models.stops import stop_token_ids


def context_length(model: Any) -> int:
    """Maximum positions the model accepts (2048 when its config does not say)."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def pad_id(tokenizer: Any) -> int:
    """The id written on padding: pad, else eos, else 0 (padding is masked, so any valid id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_prompts(tokenizer: Any, pairs: Sequence[PromptPair], max_tokens: int | None = None) -> list[list[int]]:
    """Prompt token ids: each pair's messages through the chat template with the generation prompt (a system
    message joins the first user turn where the template refuses a system role, as in training).

    Args:
        tokenizer: the model's tokenizer, with a chat template.
        pairs: held-out cases from `llm.eval.data.prompt_pairs`.
        max_tokens: keep only the last this many tokens (the end of a conversation is what the answer needs).

    Raises:
        DataError: the tokenizer has no chat template.
    """
    if pairs and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat template to render prompts with")
    out = []
    for pair in pairs:
        messages, _ = fit_roles(tokenizer, pair.messages)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append(ids[-max_tokens:] if max_tokens else ids)
    return out


def greedy_generate(model: Any, prompts: Sequence[list[int]], max_new_tokens: int, *, pad: int,
                    stop: Sequence[int] = (), batch_size: int = 8, min_new_tokens: int = 0) -> list[list[int]]:
    """New tokens of greedy decoding for each prompt, batched with left padding, cut before the first stop id.

    The four decoding options are keyword-only, each with a default: one `generate` call's settings, not a
    group worth a type of its own.

    Args:
        model: a `transformers` causal LM (eval mode).
        prompts: token ids of each prompt, in order.
        max_new_tokens: most tokens generated per prompt.
        pad: id written on the left padding (masked out).
        stop: ids that end an answer; not part of the returned tokens.
        batch_size: prompts per `generate` call.
        min_new_tokens: suppress stopping before this many tokens (throughput measurement).
    """
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, pad_token_id=pad,
                              eos_token_id=list(stop) or None, use_cache=True)
    device = model_device(model)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            # Left padding: every prompt ends at the same column, so new tokens start together.
            ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            out.append(row[:cut])
    return out


def generate_texts(model: Any, tokenizer: Any, pairs: Sequence[PromptPair], max_new_tokens: int = 64,
                   batch_size: int = 8) -> list[str]:
    """Greedy answers to each pair's prompt, decoded without special tokens and stripped."""
    prompts = encode_prompts(tokenizer, pairs, max(context_length(model) - max_new_tokens, 1))
    stop = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    tokens = greedy_generate(model, prompts, max_new_tokens, pad=pad_id(tokenizer), stop=stop, batch_size=batch_size)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def generation_metrics(model: Any, tokenizer: Any, pairs: Sequence[PromptPair], max_new_tokens: int = 64,
                       batch_size: int = 8) -> dict[str, Any]:
    """ROUGE-L F1, corpus BLEU and exact match of greedy answers against the pairs' references.

    Returns:
        `{"rouge_l", "bleu", "exact_match", "token_f1", "prompts"}` (see `llm.eval.text`).
    """
    predictions = generate_texts(model, tokenizer, pairs, max_new_tokens, batch_size)
    return text_metrics(predictions, [p.reference for p in pairs])
