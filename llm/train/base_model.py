"""The base a user brings (`finetune.base`), checked on the driver before Ray starts or any folder moves.

A local copy of Llama, Qwen, Mistral, Gemma, Phi-3, OLMo 2 or GPT-2 (or the pretrain stage's export) must
hold what the workers will load: a config `transformers` knows without remote code, weights, a tokenizer
that loads, a vocabulary its embedding covers and, where positions are a learned table (GPT-2), a context that
holds `max_len` tokens (rotary models run past theirs, and the line below says so). A failure is one
line naming the key and the file, found in a second instead of after a cluster start. What the base gets is
said in one line too: its family (one tested here, or the generic path), its own chat template or the
generic one, and the token its turns end at (what labels end with and serving stops at).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.errors import ConfigError
from llm.models.stops import end_of_turn_ids
from llm.train.lora import FAMILY_TARGETS

LEARNED_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "opt"})
"""Families whose positions are a learned table: no sequence may be longer than it."""


@dataclass(frozen=True)
class BaseFacts:
    """What the checks found out about a base."""

    model_type: str
    known: bool
    """One of the families tested here (`llm.train.lora.FAMILY_TARGETS`); else the generic path."""
    own_template: bool
    """The tokenizer ships a chat template (else `llm.train.sft.GENERIC_TEMPLATE` is used)."""
    end_of_turn: str | None
    """The token an assistant turn ends with in that template (None: the generic template's eos)."""
    context: int | None
    past_context: str | None = None
    """Set when `max_len` runs past the context of a model with rotary positions (it runs, untrained there)."""

    def line(self) -> str:
        family = (f"{self.model_type} (a tested family)" if self.known else
                  f"{self.model_type} (not a tested family: generic path, LoRA on every linear layer)")
        template = "its own chat template" if self.own_template else "no chat template: the generic one"
        end = f", turns end at {self.end_of_turn}" if self.end_of_turn else ", turns end at eos"
        past = f"; {self.past_context}" if self.past_context else ""
        return f"base {family}, {template}{end}, context {self.context or 'unknown'}{past}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _config(folder: Path, key: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:  # unknown model_type, remote code asked, a broken file
        raise ConfigError(f"{key}: {folder}/config.json does not load with this transformers ({_first_line(e)}); "
                          "llmray runs the families transformers implements, without remote code") from None


def context_of(config: Any) -> int | None:
    """Positions the model accepts, from its config (None when it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_base(folder: Path, key: str, max_len: int, max_len_key: str) -> BaseFacts:
    """Check a base directory (already known to hold a config and weights) for fine-tuning.

    Args:
        folder: the base's directory.
        key: the config key naming it (for errors).
        max_len: the longest SFT example, in tokens.
        max_len_key: the key that sets `max_len` (for errors).

    Raises:
        ConfigError: a config transformers cannot load, a tokenizer that does not load, token ids beyond the
            embedding rows, or `max_len` beyond learned positions.
    """
    from transformers import AutoTokenizer

    config = _config(folder, key)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {folder} has no tokenizer that loads ({_first_line(e)})") from None
    rows = getattr(config, "vocab_size", None)
    if isinstance(rows, int) and len(tok) > rows:
        raise ConfigError(f"{key}: the tokenizer in {folder} has {len(tok)} tokens but the model {rows} embedding "
                          "rows (a tokenizer from another model?)")
    context = context_of(config)
    model_type = str(getattr(config, "model_type", "unknown"))
    past = None
    if context is not None and max_len > context:
        if model_type in LEARNED_POSITIONS:  # a row per position: a longer example fails inside a worker
            raise ConfigError(f"{max_len_key}: {max_len} tokens, but the base {folder} has {context} learned "
                              f"positions; set {max_len_key}<={context}")
        past = f"{max_len_key}={max_len} runs past it (rotary positions: it runs, on positions never trained)"
    ends = end_of_turn_ids(tok)
    return BaseFacts(model_type=model_type, known=model_type in FAMILY_TARGETS, own_template=bool(tok.chat_template),
                     end_of_turn=str(tok.convert_ids_to_tokens(ends[0])) if ends else None, context=context,
                     past_context=past)
