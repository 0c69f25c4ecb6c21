"""PII redaction into placeholders (`<EMAIL>`, `<PHONE>`, `<IP>`, `<CARD>`), counted per kind.

Regular expressions, deliberately conservative: a missed phone number is better than a mangled version
string. Card numbers are redacted only when their digits pass the Luhn check, so long ids survive.

Every pattern costs linear time. E-mail addresses are found from their `@` (`emails`), each part matched
once with RFC 5321's length limits: the pattern `\b[...]+@...` was tried from every word boundary to the end
of its run, quadratic (minutes on one 750 KB document holding a long `a.a.a.…`). The other patterns start at
a digit and their repetitions are bounded.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Sequence

# RFC 5321's limits: a local part of at most 64 characters, labels of at most 63; at most 10 labels.
_LOCAL_MAX = 64
_LOCAL = frozenset(string.ascii_letters + string.digits + "._%+-")
_DOMAIN = re.compile(r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,63}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
# 13-19 digits, optionally grouped by single spaces or dashes.
# Not the digits of a decimal fraction or of a longer number: 0.09999999999999995 passes Luhn.
CARD = re.compile(r"(?<![\d.])\b\d(?:[ -]?\d){12,18}\b(?!\.\d)")
# +country, (area), separators; at least 10 digits in total so dates and versions are left alone, and not
# part of a longer digit group (a card number that failed Luhn is not a phone number).
PHONE = re.compile(r"(?<!\w)(?<!\d\.)(?<!\d[ -])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                   r"\d{3,4}[ .-]\d{3,4}(?!\w|[. -]\d)")

KINDS = ("email", "card", "ip", "phone")  # order matters: cards before phones, whose pattern they match


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"  # what `\w` matches in a str pattern


def emails(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of every e-mail address, left to right, not overlapping: what `\b[local]{1,64}@domain`
    finds, in time linear in `text` (each `@` looks back at most 64 characters and matches its domain once)."""
    done = 0
    at = text.find("@")
    while at != -1:
        domain = _DOMAIN.match(text, at + 1)
        start = at
        if domain:
            floor = max(done, at - _LOCAL_MAX)
            while start > floor and text[start - 1] in _LOCAL:
                start -= 1
            # the leftmost word boundary of the local part, as `\b` would start the match
            start = next((q for q in range(start, at)
                          if (q > 0 and _is_word(text[q - 1])) != _is_word(text[q])), at)
        if domain and start < at:
            yield start, domain.end()
            done = domain.end()
            at = text.find("@", done)
        else:
            at = text.find("@", at + 1)


def _sub_emails(text: str) -> tuple[str, int]:
    parts: list[str] = []
    last = n = 0
    for start, end in emails(text):
        parts += [text[last:start], "<EMAIL>"]
        last, n = end, n + 1
    return "".join(parts) + text[last:], n


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (card numbers pass it, most random numbers do not)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"\D", "", m.group())
    return "<CARD>" if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _phone(m: re.Match) -> str | None:
    return "<PHONE>" if len(re.sub(r"\D", "", m.group())) >= 10 else None


_RULES = {"card": (CARD, _card), "ip": (IPV4, lambda m: "<IP>"), "phone": (PHONE, _phone)}


def redact(text: str, kinds: Sequence[str] = KINDS) -> tuple[str, dict[str, int]]:
    """Text with PII replaced by placeholders, and the number of replacements per kind."""
    counts: dict[str, int] = {}
    for kind in KINDS:
        if kind not in kinds:
            continue
        if kind == "email":
            text, counts[kind] = _sub_emails(text)
            continue
        pattern, decide = _RULES[kind]
        n = 0

        def sub(m: re.Match, decide=decide) -> str:
            nonlocal n
            out = decide(m)
            if out is None:
                return m.group()
            n += 1
            return out

        text = pattern.sub(sub, text)
        counts[kind] = n
    return text, counts
