"""Normalization and document filters. Each filter returns None to keep a document or a drop reason.

The quality rules follow Gopher (Rae et al. 2021, appendix A): word count, mean word length, symbol-to-word
ratio, fraction of words with a letter, fraction of duplicated lines. Thresholds come from `DataConfig`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from llm.config import DataConfig, LanguageConfig, QualityConfig

# C0/C1 controls except tab and newline: they carry no text and confuse tokenizers and viewers.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"[^\S\n\t ]")  # whitespace other than newline, tab and space (no-break, thin, ...)
_FENCE = re.compile(r"[ \t]*(```|~~~)")
_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")

Filter = Callable[[str], "str | None"]


def normalize(text: str) -> str:
    """Unicode NFC, newlines for Windows and old Mac line ends, control characters removed, other whitespace
    characters made plain spaces (one for one), lines right-stripped, blank lines at both ends dropped and runs
    of blank lines collapsed to one, except inside code: in a fenced block (```` ``` ```` or `~~~`) or between
    two indented lines.

    Leading indentation and inner spacing are kept: they carry structure the model should learn (code, whose
    indentation is syntax, and aligned tables; the default corpus is Python's own documentation).
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACE.sub(" ", _CONTROL.sub("", text))
    out: list[str] = []
    fence = ""  # the open fence's marker, "" outside a fenced block
    blanks = 0
    for line in text.split("\n"):
        line = line.rstrip()
        if not line:
            blanks += 1
            continue
        if blanks and out:
            code = fence or (out[-1][0] in " \t" and line[0] in " \t")
            out += [""] * (blanks if code else 1)
        blanks = 0
        if m := _FENCE.match(line):
            fence = "" if fence and m.group(1) == fence else fence or m.group(1)
        out.append(line)
    return "\n".join(out)


def length_filter(text: str, min_chars: int, max_chars: int) -> str | None:
    """`too_short` below `min_chars`, `too_long` above `max_chars`."""
    if len(text) < min_chars:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    return None


def word_count_filter(words: list[str], q: QualityConfig) -> str | None:
    """Gopher: 50-100k words (thresholds configurable)."""
    if len(words) < q.min_words:
        return "few_words"
    if len(words) > q.max_words:
        return "many_words"
    return None


def mean_word_length_filter(words: list[str], q: QualityConfig) -> str | None:
    """Gopher: mean word length within 3-10 characters."""
    mean = sum(map(len, words)) / max(len(words), 1)
    if mean < q.min_mean_word_len:
        return "short_words"
    if mean > q.max_mean_word_len:
        return "long_words"
    return None


def symbol_ratio_filter(text: str, words: list[str], q: QualityConfig) -> str | None:
    """Gopher: '#' and ellipses per word at most 0.1."""
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return "symbols" if symbols / max(len(words), 1) > q.max_symbol_word_ratio else None


def alpha_fraction_filter(words: list[str], q: QualityConfig) -> str | None:
    """Gopher: at least 80% of words contain an alphabetic character."""
    alpha = sum(1 for w in words if _ALPHA.search(w))
    return "non_alpha" if alpha / max(len(words), 1) < q.min_alpha_word_fraction else None


def dup_line_filter(text: str, q: QualityConfig) -> str | None:
    """Gopher: the fraction of non-empty lines that repeat an earlier line at most 0.3. Lines are compared
    with their spacing collapsed: indentation alone does not make a line new."""
    lines = [" ".join(ln.split()) for ln in text.split("\n") if ln.strip()]
    if not lines:
        return None
    dup = len(lines) - len(set(lines))
    return "dup_lines" if dup / len(lines) > q.max_dup_line_fraction else None


def quality_filter(text: str, q: QualityConfig) -> str | None:
    """All Gopher-style rules in order; the first failing one names the reason."""
    if not q.enabled:
        return None
    words = _WORD.findall(text)
    return (word_count_filter(words, q) or mean_word_length_filter(words, q)
            or symbol_ratio_filter(text, words, q) or alpha_fraction_filter(words, q) or dup_line_filter(text, q))


_LANGID = None


def language_filter(text: str, lang: LanguageConfig) -> str | None:
    """`language` when langid's model (shipped in the wheel) detects a language not allowed, or is unsure."""
    global _LANGID
    if not lang.enabled:
        return None
    if _LANGID is None:  # the model loads in ~1 s: once per worker process
        from langid.langid import LanguageIdentifier, model

        _LANGID = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    code, score = _LANGID.classify(text[:5000])
    return None if code in lang.allowed and score >= lang.min_score else "language"


def document_filter(text: str, cfg: DataConfig) -> str | None:
    """Every filter of the stage on a normalized document; None keeps it."""
    return (length_filter(text, cfg.min_chars, cfg.max_chars) or quality_filter(text, cfg.quality)
            or language_filter(text, cfg.language))
