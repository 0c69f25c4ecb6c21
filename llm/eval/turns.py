"""Conversations as a family's own chat template takes them, and loss labels that end where a turn ends.

Two things differ between families and are settled here, for fine-tuning (its labels) and evaluation (its
prompts and SFT rows) alike:

- **A template that refuses a system role.** Gemma 2's raises "System role not supported". A user who
  brings chat data with system prompts expects the instruction to be followed, not lost, so the system
  text goes at the head of the first user turn (what Gemma 3's template and Google's guidance do); the
  caller counts the records changed. Any other refusal (roles out of order, a second system message) is
  the record's problem: the caller drops it with a reason.
- **What a labelled span holds.** `llm.models.chat.render` labels everything between an assistant turn's
  generation prompt and the end of that turn as rendered on its own, which for some templates runs past
  the end-of-turn token: ChatML's newline after `<|im_end|>`, Phi-3's eos appended after a conversation
  and, in a multi-turn record, the next turn's `<|user|>` header. Labels here stop at the end-of-turn token
  (`llm.models.stops.end_of_turn_ids`): the model learns to close the turn and nothing after it, and serving
  stops at that very token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm.models.chat import IGNORE, render
from llm.models.stops import end_of_turn_ids

_SYSTEM_OK: dict[str, bool] = {}
"""Chat template -> whether it renders a leading system message (probed once per template)."""


def accepts_system(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a conversation that opens with a system message."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return True  # no template (or a dict of named ones): nothing to adapt here
    if template not in _SYSTEM_OK:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            _SYSTEM_OK[template] = True
        except Exception:  # the template is Jinja code of its own: raise_exception or any error means "no"
            _SYSTEM_OK[template] = False
    return _SYSTEM_OK[template]


def fit_roles(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], bool]:
    """`messages` as the tokenizer's template accepts them, and whether they were changed: a leading system
    message joins the first user turn (`system + "\\n\\n" + user`) when the template refuses a system role;
    otherwise the messages are returned as they are."""
    if (len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user"
            or accepts_system(tokenizer)):
        return messages, False
    first = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]], True


def end_at_turn(labels: list[int], end_ids: Sequence[int]) -> list[int]:
    """`labels` with every labelled span cut right after its first end-of-turn token (unchanged without
    one: a template whose turns end in plain text keeps its spans as rendered)."""
    if not end_ids:
        return labels
    out, inside, closed = list(labels), False, False
    for i, lab in enumerate(out):
        if lab == IGNORE:
            inside = closed = False
            continue
        if not inside:
            inside, closed = True, False
        if closed:
            out[i] = IGNORE
        elif lab in end_ids:
            closed = True
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]],
                end_ids: Sequence[int] | None = None) -> tuple[list[int], list[int], bool]:
    """`input_ids`, `labels` (assistant turns up to and including their end-of-turn token) and whether the
    roles were adapted (`fit_roles`), of one conversation in the tokenizer's own template.

    Args:
        tokenizer: the model's tokenizer, with its chat template.
        messages: the conversation (system / user / assistant messages).
        end_ids: the template's end-of-turn ids when the caller already has them (one probe per source
            instead of one per record); default: probed here.

    Raises:
        Exception: whatever the template raises for a conversation it refuses (the caller names the record).
    """
    fitted, changed = fit_roles(tokenizer, messages)
    ids, labels = render(tokenizer, fitted)
    ends = end_of_turn_ids(tokenizer) if end_ids is None else end_ids
    return ids, end_at_turn(labels, ends), changed
