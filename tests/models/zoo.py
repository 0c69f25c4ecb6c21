"""A zoo of tiny models, one per common open decoder family, written as ordinary Hugging Face directories.

No hub is reachable, so each family is made here the way a user's local copy looks, minus trained weights:
a random-initialised model from the family's own `transformers` config class (its real attention, norm,
bias, tying and soft-capping layout, scaled down to 2 layers of width 64), a byte-level BPE trained here on
Python's help text with the family's real special tokens, its chat template in the family's real format, and
the `generation_config.json` its base checkpoints ship (mostly eos = end-of-text only, which is why the
end-of-turn token has to be read from the template).

`write_family(name, folder)` writes one; tests get them cached per session from `tests/models/conftest.py`
(`zoo` fixture), benches call `write_family` into a folder of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTEXT = 256
WIDTH = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=CONTEXT)

CHATML = ("{%- for message in messages %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Qwen2.5 opens every conversation without a system message with its default one.
QWEN2_CHATML = ("{%- if messages[0]['role'] != 'system' %}"
                "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}" + CHATML)
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}"
          "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Mistral has no generation prompt: an answer follows `[/INST]`; a system message joins the first user turn.
MISTRAL = ("{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
           "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}"
           "{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}"
           "{%- for message in loop_messages %}"
           "{%- if message['role'] == 'user' %}"
           "{{- '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
           "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
           "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
           "{%- endfor %}")
_GEMMA_TURNS = ("{%- for message in loop_messages %}"
                "{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}"
                "{%- else %}{%- set role = message['role'] %}{%- endif %}"
                "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim"
                " + '<end_of_turn>\\n' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}")
# Gemma 2 refuses a system role; Gemma 3 folds it into the first user turn.
GEMMA2 = ("{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}"
          "{%- endif %}{%- set prefix = '' %}{%- set loop_messages = messages %}{{- bos_token }}" + _GEMMA_TURNS)
GEMMA3 = ("{%- if messages[0]['role'] == 'system' %}{%- set prefix = messages[0]['content'] + '\\n\\n' %}"
          "{%- set loop_messages = messages[1:] %}{%- else %}{%- set prefix = '' %}"
          "{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}" + _GEMMA_TURNS)
PHI3 = ("{%- for message in messages %}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}")
# OLMo 2 Instruct (the Tulu 3 format): role headers are plain text, the turn ends with eos.
OLMO2 = ("{{- bos_token }}{%- for message in messages %}"
         "{%- if message['role'] == 'assistant' %}"
         "{{- '<|assistant|>\\n' + message['content'] + eos_token + ('' if loop.last else '\\n') }}"
         "{%- else %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{%- endif %}"
         "{%- if loop.last and add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
         "{%- endfor %}")


@dataclass(frozen=True)
class Family:
    """One decoder family as its checkpoints ship: tokens, template, generation config and model config."""

    name: str
    model_type: str
    specials: tuple[str, ...]
    """Control tokens (added as special tokens, never split)."""
    eos: str
    turn_end: str | None
    """The token the template closes an assistant turn with (None: no chat template)."""
    generation_eos: tuple[str, ...]
    """The eos token(s) of the family's shipped `generation_config.json`."""
    config: Callable[[int, Callable[[str | None], int | None]], Any]
    """(vocab_size, token -> id) -> the family's `transformers` config."""
    template: str | None = None
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    added: tuple[str, ...] = ()
    """Added tokens that are not special (Qwen3's `<think>`)."""
    add_bos: bool = False
    """The tokenizer prepends bos when encoding (Llama, Mistral, Gemma)."""
    vocab_multiple: int = 1
    """Embedding rows are rounded up to a multiple of this (Qwen, Phi-3, OLMo 2 pad their vocabulary)."""
    generation_extra: dict[str, Any] = field(default_factory=dict)
    """Other fields of the shipped generation config (sampling defaults)."""


def _llama(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaConfig(vocab_size=v, **WIDTH, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                       rope_parameters=rope, bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|end_of_text|>"))


def _qwen2(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import Qwen2Config

    eot = ids("<|endoftext|>")
    return Qwen2Config(vocab_size=v, **WIDTH, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                       max_window_layers=2, bos_token_id=eot, eos_token_id=eot)


def _qwen3(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import Qwen3Config

    eot = ids("<|endoftext|>")
    return Qwen3Config(vocab_size=v, **WIDTH, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                       attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       use_sliding_window=False, max_window_layers=2, bos_token_id=eot, eos_token_id=eot)


def _mistral(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=v, **WIDTH, num_key_value_heads=2, head_dim=16, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         bos_token_id=ids("<s>"), eos_token_id=ids("</s>"))


def _gemma_ids(ids: Callable[[str | None], int | None]) -> dict[str, Any]:
    return {"bos_token_id": ids("<bos>"), "eos_token_id": ids("<eos>"), "pad_token_id": ids("<pad>")}


def _gemma2(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import Gemma2Config

    width = {**WIDTH, "intermediate_size": 128}
    return Gemma2Config(vocab_size=v, **width, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        tie_word_embeddings=True, **_gemma_ids(ids))


def _gemma3(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import Gemma3TextConfig

    width = {**WIDTH, "intermediate_size": 128}
    return Gemma3TextConfig(vocab_size=v, **width, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=32, layer_types=["sliding_attention", "full_attention"],
                            tie_word_embeddings=True, **_gemma_ids(ids))


def _phi3(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(vocab_size=v, **WIDTH, num_key_value_heads=4, original_max_position_embeddings=CONTEXT,
                      tie_word_embeddings=False, bos_token_id=ids("<s>"), eos_token_id=ids("<|endoftext|>"),
                      pad_token_id=ids("<|endoftext|>"))


def _olmo2(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import Olmo2Config

    return Olmo2Config(vocab_size=v, **WIDTH, num_key_value_heads=4, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       bos_token_id=None, eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|pad|>"))


def _gpt2(v: int, ids: Callable[[str | None], int | None]) -> Any:
    from transformers import GPT2Config

    eot = ids("<|endoftext|>")
    return GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=CONTEXT, bos_token_id=eot,
                      eos_token_id=eot)


_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
FAMILIES: dict[str, Family] = {f.name: f for f in [
    # Llama 3.2 base: GQA, tied embeddings, llama3 rope scaling; eos is end-of-text, turns end at <|eot_id|>.
    Family("llama", "llama", ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                              "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"),
           eos="<|end_of_text|>", bos="<|begin_of_text|>", turn_end="<|eot_id|>", template=LLAMA3, add_bos=True,
           generation_eos=("<|end_of_text|>",), generation_extra=_SAMPLING, config=_llama),
    # Qwen2.5 base: q/k/v biases, tied embeddings, ChatML, a padded vocabulary.
    Family("qwen2", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|endoftext|>",
           pad="<|endoftext|>", turn_end="<|im_end|>", template=QWEN2_CHATML, vocab_multiple=64,
           generation_eos=("<|endoftext|>",), generation_extra={"do_sample": False, "max_new_tokens": 2048},
           config=_qwen2),
    # Qwen3 base: per-head q_norm/k_norm, explicit head_dim, ChatML, <think> as plain added tokens.
    Family("qwen3", "qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), added=("<think>", "</think>"),
           eos="<|endoftext|>", pad="<|endoftext|>", turn_end="<|im_end|>", template=CHATML, vocab_multiple=64,
           generation_eos=("<|endoftext|>",), generation_extra={"do_sample": False, "max_new_tokens": 2048},
           config=_qwen3),
    # Mistral v0.3: GQA, [INST] control tokens; an answer ends with </s>, which is eos.
    Family("mistral", "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), eos="</s>", bos="<s>",
           unk="<unk>", turn_end="</s>", template=MISTRAL, add_bos=True, generation_eos=("</s>",), config=_mistral),
    # Gemma 2 base: soft-capping, alternating sliding windows, scaled embeddings, tied, <end_of_turn>.
    Family("gemma2", "gemma2", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
           eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>", turn_end="<end_of_turn>", template=GEMMA2,
           add_bos=True, generation_eos=("<eos>",), config=_gemma2),
    # Gemma 3 1B base (text only): q_norm/k_norm, sliding and global layers with their own rope.
    Family("gemma3", "gemma3_text", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
           eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>", turn_end="<end_of_turn>", template=GEMMA3,
           add_bos=True, generation_eos=("<eos>",), config=_gemma3),
    # Phi-3 mini instruct (there is no base): fused qkv_proj and gate_up_proj; ships its stops already.
    Family("phi3", "phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                            "<|user|>"),
           eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", unk="<unk>", turn_end="<|end|>", template=PHI3,
           vocab_multiple=64, generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), config=_phi3),
    # OLMo 2: whole-projection q_norm/k_norm, post-norms; the Tulu template ends a turn with eos.
    Family("olmo2", "olmo2", ("<|endoftext|>", "<|pad|>"), eos="<|endoftext|>", bos="<|endoftext|>",
           pad="<|pad|>", turn_end="<|endoftext|>", template=OLMO2, vocab_multiple=64,
           generation_eos=("<|endoftext|>",), config=_olmo2),
    # GPT-2: Conv1D layers, learned positions, tied; no chat template at all.
    Family("gpt2", "gpt2", ("<|endoftext|>",), eos="<|endoftext|>", bos="<|endoftext|>", unk="<|endoftext|>",
           turn_end=None, generation_eos=("<|endoftext|>",), config=_gpt2),
]}


@functools.lru_cache(maxsize=1)
def _bpe() -> str:
    """A byte-level BPE (512 entries) trained once on Python's help text, as JSON; families add their tokens."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:24]], trainer=trainer)
    return str(tok.to_str())


def tokenizer(family: Family) -> Any:
    """The family's tokenizer: the shared BPE plus its special tokens, bos/eos/pad/unk and chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_bpe())
    tok.add_special_tokens(list(family.specials))
    if family.added:
        tok.add_tokens(list(family.added))
    if family.add_bos and family.bos:
        bos = (family.bos, tok.token_to_id(family.bos))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, unk_token=family.unk, model_max_length=CONTEXT)
    if family.template:
        fast.chat_template = family.template
    return fast


def write_family(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model of family `name` (a key of `FAMILIES`) as a Hugging Face directory into `folder`.

    Returns:
        `folder`, holding config.json, model.safetensors, generation_config.json and the tokenizer files.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[name]
    out = Path(folder)
    tok = tokenizer(family)

    def ids(token: str | None) -> int | None:
        return None if token is None else int(tok.convert_tokens_to_ids(token))

    rows = -(-len(tok) // family.vocab_multiple) * family.vocab_multiple
    config = family.config(rows, ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    eos = [ids(t) for t in family.generation_eos]
    model.generation_config = GenerationConfig(bos_token_id=ids(family.bos), eos_token_id=eos[0] if len(eos) == 1
                                               else eos, pad_token_id=ids(family.pad), **family.generation_extra)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
