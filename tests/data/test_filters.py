"""Normalization and every filter, each with a document it keeps and one it drops."""

from __future__ import annotations

from llm.config import DataConfig, LanguageConfig, QualityConfig
from llm.data import filters

Q = QualityConfig()
PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch. " * 3).strip()


def words(text: str) -> list[str]:
    return text.split()


def test_normalize_nfc_controls_whitespace():
    text = "Cafe\u0301\x00\x07 is   here\t\tnow \r\n\n\n\nnext\x1b line  "
    assert filters.normalize(text) == "Caf\u00e9 is here now\n\nnext line"


def test_length_filter():
    assert filters.length_filter("abc", 5, 10) == "too_short"
    assert filters.length_filter("a" * 11, 5, 10) == "too_long"
    assert filters.length_filter("a" * 7, 5, 10) is None


def test_word_count_filter():
    assert filters.word_count_filter(words("one two"), Q) == "few_words"
    assert filters.word_count_filter(words(PROSE), Q) is None
    assert filters.word_count_filter(["w"] * 11, QualityConfig(min_words=1, max_words=10)) == "many_words"


def test_mean_word_length_filter():
    assert filters.mean_word_length_filter(words("a b c d e f"), Q) == "short_words"
    assert filters.mean_word_length_filter(["x" * 15] * 5, Q) == "long_words"
    assert filters.mean_word_length_filter(words(PROSE), Q) is None


def test_symbol_ratio_filter():
    text = "# heading # more # and ... so ... on " * 3
    assert filters.symbol_ratio_filter(text, words(text), Q) == "symbols"
    assert filters.symbol_ratio_filter(PROSE, words(PROSE), Q) is None


def test_alpha_fraction_filter():
    nums = "12 34 56 78 90 11 word"
    assert filters.alpha_fraction_filter(words(nums), Q) == "non_alpha"
    assert filters.alpha_fraction_filter(words(PROSE), Q) is None


def test_dup_line_filter():
    assert filters.dup_line_filter("same line\nsame line\nsame line\nother", Q) == "dup_lines"
    assert filters.dup_line_filter("a line\nanother line\nthird one", Q) is None


def test_quality_filter_disabled_keeps_everything():
    assert filters.quality_filter("x", QualityConfig(enabled=False)) is None
    assert filters.quality_filter("x", Q) == "few_words"


def test_language_filter():
    lang = LanguageConfig(enabled=True, allowed=["en"])
    french = ("Le renard brun saute par-dessus le chien paresseux pendant que le fermier regarde depuis la "
              "maison. Nous avons mangé du pain et du fromage avec nos amis hier soir.")
    assert filters.language_filter(PROSE, lang) is None
    assert filters.language_filter(french, lang) == "language"
    assert filters.language_filter(french, LanguageConfig(enabled=False)) is None


def test_document_filter_order():
    cfg = DataConfig(min_chars=10)
    assert filters.document_filter("tiny", cfg) == "too_short"
    assert filters.document_filter(PROSE, cfg) is None
