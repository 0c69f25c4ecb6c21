"""Chat primitives shared by every stage that reads conversations: the project's special tokens and chat
template, record -> messages, and rendering a conversation into `input_ids` and loss-masked `labels`.

Assistant spans are found by rendering prefixes of the conversation: the tokens between "everything before
this turn plus the generation prompt" and "everything up to the end of this turn" are the turn's answer,
its closing end-of-turn token included, so the model learns to stop. This works for any template whose
turns begin and end at special tokens, which is what chat templates are built around.
"""

from __future__ import annotations

from typing import Any

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ROLES = ("system", "user", "assistant")
"""The roles a message may have."""
END = "<|end|>"
SPECIAL = [EOS, PAD, *(f"<|{r}|>" for r in ROLES), END]

# Each message is `<|role|>\ncontent<|end|>\n`; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


IGNORE = -100
"""The label of a token that is not trained on (outside assistant turns)."""


def to_messages(record: Any) -> list[dict[str, str]] | str:
    """The messages of a `{"messages": [...]}` or `{"prompt", "response"}` record, or why it is invalid."""
    if not isinstance(record, dict):
        return "not_an_object"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "bad_messages"
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return "bad_messages"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no_assistant"
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return "missing_field"


def _ids(tok: Any, messages: list[dict[str, str]], generation: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) if messages else ""
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def render(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """`input_ids` of the whole conversation and `labels` that keep only the assistant turns."""
    ids = _ids(tok, messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tok, messages[:i], True))
        end = len(_ids(tok, messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids, labels
