"""The data stage's section: read, clean, dedup, tokenizer, pack, SFT formatting."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from llm.config.base import Section


class QualityConfig(Section):
    """Gopher-style document quality heuristics (Rae et al. 2021, appendix A). `enabled: false` skips all."""

    enabled: bool = True
    """Apply the quality filters at all."""
    min_words: int = Field(20, ge=0)
    """Drop documents with fewer words (reason `few_words`)."""
    max_words: int = Field(100_000, gt=0)
    """Drop documents with more words (reason `many_words`)."""
    min_mean_word_len: float = Field(3.0, ge=0)
    """Drop when the mean word length is below this (reason `short_words`)."""
    max_mean_word_len: float = Field(10.0, gt=0)
    """Drop when the mean word length is above this (reason `long_words`)."""
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    """Drop when '#' and '...' per word exceed this (reason `symbols`)."""
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1)
    """Drop when fewer words than this fraction contain a letter (reason `non_alpha`)."""
    max_dup_line_fraction: float = Field(0.3, ge=0, le=1)
    """Drop when more lines than this fraction repeat another line (reason `dup_lines`)."""

    @model_validator(mode="after")
    def _bounds(self) -> QualityConfig:
        _ordered(self, ("min_words", "max_words"), ("min_mean_word_len", "max_mean_word_len"))
        return self


class LanguageConfig(Section):
    """Language identification with a model shipped inside a PyPI package (nothing downloaded at run time)."""

    enabled: bool = False
    """Filter by language at all."""
    allowed: list[str] = Field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep; others are dropped as `language`."""
    min_score: float = Field(0.5, ge=0, le=1)
    """Minimum confidence of the detected language."""


class PiiConfig(Section):
    """PII redaction into placeholders such as `<EMAIL>`; counts per kind land in the stats."""

    enabled: bool = True
    """Redact PII at all."""
    kinds: list[Literal["email", "phone", "ip", "card"]] = Field(
        default=["email", "phone", "ip", "card"]  # pydantic copies mutable defaults per instance
    )
    """Which kinds to redact. Card numbers are redacted only when they pass the Luhn check."""


class FuzzyDedupConfig(Section):
    """MinHash + LSH near-duplicate removal."""

    enabled: bool = True
    """Run fuzzy dedup at all."""
    threshold: float = Field(0.8, gt=0, lt=1)
    """Jaccard similarity above which two documents are duplicates; LSH bands/rows derive from it."""
    num_perm: int = Field(128, ge=8, le=1024)
    """Number of MinHash permutations."""
    ngram: int = Field(5, ge=1, le=32)
    """Word n-gram (shingle) size."""
    seed: int = 42
    """Seed of the permutations: same seed, same signatures."""


class DedupConfig(Section):
    """Exact and fuzzy deduplication."""

    exact: bool = True
    """Drop documents whose normalized content hash was seen before (deterministic survivor)."""
    fuzzy: FuzzyDedupConfig = Field(default_factory=FuzzyDedupConfig)
    """Near-duplicate removal."""


class TokenizerConfig(Section):
    """Tokenizer: train a byte-level BPE on a sample of the cleaned text, or use a local one."""

    path: str | None = None
    """A local directory that `AutoTokenizer.from_pretrained` loads; when set, nothing is trained."""
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    """Vocabulary size of the trained BPE, special tokens included."""
    sample_bytes: int = Field(50_000_000, gt=0)
    """Train on at most this many bytes of cleaned text."""
    min_frequency: int = Field(2, ge=1)
    """Merges need at least this many occurrences."""


class SftConfig(Section):
    """Supervised fine-tuning data: chat or instruction JSONL rendered with the chat template."""

    sources: list[str] = Field(default_factory=list)
    """JSONL paths or globs (`messages` or `prompt`/`response` records), Hugging Face `datasets` folders
    (`save_to_disk`), or `builtin:python-sft`."""
    max_len: int = Field(512, ge=16)
    """Examples longer than this many tokens are truncated (counted)."""
    val_fraction: float = Field(0.05, ge=0, lt=1)
    """Fraction of examples held out, chosen by example hash."""


def _ordered(section: Section, *pairs: tuple[str, str]) -> None:
    """Each (low, high) pair of fields with low <= high, else a ValueError naming both keys: a range that
    admits nothing would drop every document, each for a reason that looks valid."""
    for low, high in pairs:
        a, b = getattr(section, low), getattr(section, high)
        if a > b:
            raise ValueError(f"{low} ({a:g}) must be <= {high} ({b:g}): no document could pass")


class DataConfig(Section):
    """Data stage: read, clean, dedup, train a tokenizer, tokenize and pack, format SFT data."""

    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"enabled", "parallelism", "max_errored_blocks"})

    enabled: bool = True
    """Run this stage in `llmray run`."""
    sources: list[str] = Field(default_factory=lambda: ["builtin:python-docs"])
    """Local paths or globs (txt, jsonl, parquet, .gz), s3:// or gs:// URIs, Hugging Face `datasets` folders
    (`save_to_disk`), or `builtin:python-docs`."""
    text_field: str = "text"
    """Column or JSON key holding the text in jsonl, parquet and `datasets` sources."""
    min_chars: int = Field(200, ge=0)
    """Drop documents shorter than this (reason `too_short`)."""
    max_chars: int = Field(1_000_000, gt=0)
    """Drop documents longer than this (reason `too_long`); longer lines are never held whole in memory."""
    quality: QualityConfig = Field(default_factory=QualityConfig)
    """Gopher-style quality filters."""
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    """Language identification filter."""
    pii: PiiConfig = Field(default_factory=PiiConfig)
    """PII redaction."""
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    """Deduplication."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """Tokenizer training or loading."""
    seq_len: int = Field(512, ge=8)
    """Length of every packed training sequence, in tokens."""
    val_fraction: float = Field(0.02, ge=0, lt=1)
    """Fraction of documents held out for validation, chosen by document hash."""
    sft: SftConfig = Field(default_factory=SftConfig)
    """Fine-tuning data formatting."""
    keep_dropped: bool = False
    """Write dropped documents with their reason under `data/dropped/`."""
    rows_per_shard: int = Field(4096, gt=0)
    """Packed sequences per output parquet shard (upper bound)."""
    parallelism: int | None = Field(None, gt=0)
    """Ray Data parallelism override; by default derived from the cluster's CPUs."""
    max_errored_blocks: int = Field(0, ge=0)
    """Ray Data `max_errored_blocks`. 0: a block error fails the stage, since bad records are already caught
    per record and per file; a block error means a bug, and silently losing a block would lose data."""

    @model_validator(mode="after")
    def _bounds(self) -> DataConfig:
        _ordered(self, ("min_chars", "max_chars"))
        return self
