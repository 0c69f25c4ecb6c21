"""Scoring generated text against references: ROUGE-L F1 (`rouge-score`), corpus BLEU (`sacrebleu`),
exact match after whitespace normalisation and token-level F1 (SQuAD's answer F1).

ROUGE-L uses rouge-score's default tokenizer (lower-cased, alphanumeric runs only, no stemming), so
punctuation and case differences do not count against a model; BLEU is sacrebleu's standard 13a corpus
score on a 0-100 scale; exact match is the fraction of predictions equal to their reference; token F1 is
the mean over pairs of the harmonic mean of token precision and recall after SQuAD's answer normalisation
(lower case, punctuation and the articles a/an/the dropped), so a partly right answer earns part credit.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


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


def answer_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, punctuation and articles dropped, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean token-level F1 (0-1) over prediction/reference pairs, tokens as `answer_tokens` gives them: two
    empty answers agree (1.0), one empty answer scores 0.0 (0.0 for an empty set)."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    scores = []
    for p, r in zip(predictions, references, strict=True):
        pred, ref = answer_tokens(p), answer_tokens(r)
        if not pred or not ref:
            scores.append(float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        precision, recall = common / len(pred), common / len(ref)
        scores.append(0.0 if common == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)


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
    """`{"rouge_l", "bleu", "exact_match", "token_f1", "prompts"}` of a set of generations."""
    return {"rouge_l": rouge_l(predictions, references), "bleu": bleu(predictions, references),
            "exact_match": exact_match(predictions, references), "token_f1": token_f1(predictions, references),
            "prompts": len(predictions)}
