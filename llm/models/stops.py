"""Where an answer ends: the one stop rule that eval and serve share, and the `generation_config.json` that
carries it in every model directory the project writes.

A chat model closes an assistant turn with its template's end-of-turn token (`<|end|>` here, `<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>` elsewhere), which is often not the tokenizer's eos: base checkpoints and the
models trained here name only the end-of-text token as eos. An engine that stops on eos alone then runs on
into invented turns. The end-of-turn token is read from the template itself (render a one-turn conversation
around a marker answer and take the special token right after it), so any family's template works without a
table of known tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

GENERATION_CONFIG = "generation_config.json"
_MARKER = "zq7marker7qz"
_PROBE = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _MARKER}]


def _control_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special and added tokens (`<|im_end|>` is an added token, not a 'special' one)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
    try:
        ids.update(int(i) for i in tokenizer.get_added_vocab().values())
    except (AttributeError, NotImplementedError):
        pass
    return ids


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token id the tokenizer's chat template closes an assistant turn with, as a list.

    The template renders a user turn and an assistant turn whose content is a marker; the first special or
    added token after the marker, with at most whitespace in between, ends the turn. A template that ends
    turns with plain text (or none at all) gives `[]`, and so does a template that fails to render: this is
    a probe, and an odd template must not stop a stage.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=False)
        if not isinstance(text, str) or _MARKER not in text:
            return []
        ids = tokenizer(text.split(_MARKER, 1)[1], add_special_tokens=False)["input_ids"]
    except Exception:  # a template may raise anything (jinja errors, raise_exception, role checks)
        return []
    control = _control_ids(tokenizer)
    for i in ids:
        if int(i) in control:
            return [int(i)]
        if tokenizer.decode([i]).strip():  # text before any control token: the turn ends in plain text
            return []
    return []


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, the generation config's eos (int or list) and the
    chat template's end-of-turn token, sorted and without repeats.

    Args:
        tokenizer: the model's tokenizer (with its chat template, if it has one).
        generation_config: the model's `GenerationConfig` (or anything with `eos_token_id`), or None.
    """
    ids = set(_as_ids(getattr(tokenizer, "eos_token_id", None)))
    ids.update(_as_ids(getattr(generation_config, "eos_token_id", None)))
    ids.update(end_of_turn_ids(tokenizer))
    return sorted(ids)


def _starting_config(folder: Path, model: Any) -> Any:
    """The generation config to extend: the model's own, else the one already in `folder`, else one derived
    from the model config (a model, a config object, or `folder/config.json`)."""
    from transformers import AutoConfig, GenerationConfig

    own = getattr(model, "generation_config", None)
    if own is not None:
        return copy.deepcopy(own)
    if (folder / GENERATION_CONFIG).is_file():
        return GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    config = getattr(model, "config", model)
    if config is None and (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return GenerationConfig.from_model_config(config) if config is not None else GenerationConfig()


def write_generation_config(folder: str | Path, model: Any, tokenizer: Any) -> Path:
    """Write `folder/generation_config.json` whose `eos_token_id` lists every stop id (`stop_token_ids`).

    Other fields (sampling defaults a family ships, say) are kept from the model's generation config, else
    from one already in `folder`; bos and pad come from the tokenizer where it has them (pad falls back to
    eos: padding is masked).

    Args:
        folder: the model directory.
        model: the model, its config, or None (then `folder`'s generation config or `config.json` is read).
        tokenizer: the tokenizer saved with the model (its eos and chat template give the stop ids).

    Returns:
        The path of the written file.
    """
    out = Path(folder)
    gen = _starting_config(out, model)
    gen.eos_token_id = stop_token_ids(tokenizer, gen)
    bos, pad = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "pad_token_id", None)
    if bos is not None:
        gen.bos_token_id = int(bos)
    if pad is not None:
        gen.pad_token_id = int(pad)
    elif gen.pad_token_id is None and getattr(tokenizer, "eos_token_id", None) is not None:
        gen.pad_token_id = int(tokenizer.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    # Not `gen.save_pretrained`: it refuses a modified config with any inconsistency (published configs often
    # set `temperature` without `do_sample`), and the fields a family ships are kept as shipped.
    gen.to_json_file(str(out / GENERATION_CONFIG), use_diff=True, keys_to_pop=["compile_config"])
    return out / GENERATION_CONFIG
