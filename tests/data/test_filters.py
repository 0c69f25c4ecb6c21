"""Normalization and every filter, each with a document it keeps and one it drops."""

from __future__ import annotations

from llm.config import DataConfig, LanguageConfig, QualityConfig
from llm.data import filters

Q = QualityConfig()
PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch. " * 3).strip()


def words(text: str) -> list[str]:
    return text.split()


def test_normalize_nfc_controls_whitespace():
    # Inner spacing is kept since issue 20 (it was collapsed to one space, which destroyed code and tables).
    text = "Cafe\u0301\x00\x07 is   here\t\tnow \r\n\n\n\nnext\x1b line\u00a0 \n\n"
    assert filters.normalize(text) == "Caf\u00e9 is   here\t\tnow\n\nnext line"
    assert filters.normalize("a\u00a0\u2009b") == "a  b"  # other spaces become plain ones, one for one


# A document with prose, a Python example (indented, with PEP 8's two blank lines), a fenced block, a table and
# nested lists, with trailing spaces, CRLF line ends and runs of blank lines: what normalization must keep.
RAW = (
    "\n\n  \nUsing the API   \r\n"
    "=============\r\n"
    "\n\n\n"
    "Call it like this::\n"
    "\n"
    "    def area(w, h):\n"
    "        \"\"\"Area.\"\"\"   \n"
    "        if w < 0:\n"
    "            raise ValueError(w)\n"
    "\n"
    "\n"
    "        return w * h\n"
    "\n\n\n"
    "```python\n"
    "import math\n"
    "\n"
    "\n"
    "print(math.pi)\t\n"
    "```\n"
    "\n\n"
    "| name  | value |\n"
    "|-------|------:|\n"
    "| alpha |    10 |\n"
    "\n"
    "- first item\n"
    "  continued here   \n"
    "  - nested item\n"
    "    1. deeper\n"
    "\n\n\n\n"
    "The end.  \n\n"
)
GOLDEN = (
    "Using the API\n"
    "=============\n"
    "\n"
    "Call it like this::\n"
    "\n"
    "    def area(w, h):\n"
    "        \"\"\"Area.\"\"\"\n"
    "        if w < 0:\n"
    "            raise ValueError(w)\n"
    "\n"
    "\n"  # two blank lines between indented lines: inside the code block, kept
    "        return w * h\n"
    "\n"
    "```python\n"
    "import math\n"
    "\n"
    "\n"  # inside a fenced block: kept
    "print(math.pi)\n"
    "```\n"
    "\n"
    "| name  | value |\n"
    "|-------|------:|\n"
    "| alpha |    10 |\n"
    "\n"
    "- first item\n"
    "  continued here\n"
    "  - nested item\n"
    "    1. deeper\n"
    "\n"
    "The end."
)


def test_normalize_keeps_code_tables_and_lists_golden():
    """Only trailing whitespace goes, line ends become newlines and blank runs outside code collapse to one:
    indentation, the inside of code blocks and the spacing of a table survive."""
    assert filters.normalize(RAW) == GOLDEN
    assert filters.normalize(GOLDEN) == GOLDEN  # idempotent


def test_normalize_keeps_python_source_runnable():
    source = "class A:\n    def f(self):\n        return {\n            'k': [1,  2],\n        }\n"
    namespace: dict = {}
    exec(compile(filters.normalize(source), "<doc>", "exec"), namespace)
    assert namespace["A"]().f() == {"k": [1, 2]}


def test_dup_lines_ignore_indentation_as_before():
    """Lines are compared with their spacing collapsed, as they were when normalization collapsed it."""
    assert filters.dup_line_filter("x = 1\n    x = 1\n  x  =  1\nother", Q) == "dup_lines"


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
