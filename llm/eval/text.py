"""Scoring generated text against references: ROUGE-L F1 (`rouge-score`), corpus BLEU (`sacrebleu`) and
exact match after whitespace normalisation.

ROUGE-L uses rouge-score's default tokenizer (lower-cased, alphanumeric runs only, no stemming), so
punctuation and case differences do not count against a model; BLEU is sacrebleu's standard 13a corpus
score on a 0-100 scale; exact match is the fraction of predictions equal to their reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def normalize(text: str) -> str:
    """`text` with surrounding whitespace dropped and inner runs of whitespace collapsed to one space."""
    return " ".join(text.split())


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize` (0.0 for an empty set)."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (0-1) over prediction/reference pairs (0.0 for an empty set)."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # rouge-score's argument order is (target, prediction).
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return float(sum(scores) / len(scores))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of the predictions against one reference each (0.0 for an empty set)."""
    import sacrebleu

    _check(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """`{"rouge_l", "bleu", "exact_match", "prompts"}` of a set of generations."""
    return {"rouge_l": rouge_l(predictions, references), "bleu": bleu(predictions, references),
            "exact_match": exact_match(predictions, references), "prompts": len(predictions)}
