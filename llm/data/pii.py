"""PII redaction into placeholders (`<EMAIL>`, `<PHONE>`, `<IP>`, `<CARD>`), counted per kind.

Regular expressions, deliberately conservative: a missed phone number is better than a mangled version
string. Card numbers are redacted only when their digits pass the Luhn check, so long ids survive.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
# 13-19 digits, optionally grouped by single spaces or dashes.
# Not the digits of a decimal fraction or of a longer number: 0.09999999999999995 passes Luhn.
CARD = re.compile(r"(?<![\d.])\b\d(?:[ -]?\d){12,18}\b(?!\.\d)")
# +country, (area), separators; at least 10 digits in total so dates and versions are left alone, and not
# part of a longer digit group (a card number that failed Luhn is not a phone number).
PHONE = re.compile(r"(?<!\w)(?<!\d\.)(?<!\d[ -])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                   r"\d{3,4}[ .-]\d{3,4}(?!\w|[. -]\d)")

KINDS = ("email", "card", "ip", "phone")  # order matters: cards before phones, whose pattern they match


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


_RULES = {"email": (EMAIL, lambda m: "<EMAIL>"), "card": (CARD, _card), "ip": (IPV4, lambda m: "<IP>"),
          "phone": (PHONE, _phone)}


def redact(text: str, kinds: Sequence[str] = KINDS) -> tuple[str, dict[str, int]]:
    """Text with PII replaced by placeholders, and the number of replacements per kind."""
    counts: dict[str, int] = {}
    for kind in KINDS:
        if kind not in kinds:
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
