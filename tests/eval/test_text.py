"""ROUGE-L, BLEU, exact match and token F1 against values worked out by hand."""

from __future__ import annotations

import pytest

from llm.eval import bleu, exact_match, normalize, rouge_l, text_metrics, token_f1


def test_identical_strings_score_perfectly():
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert text_metrics(refs, refs) == {"rouge_l": 1.0, "bleu": pytest.approx(100.0), "exact_match": 1.0,
                                        "token_f1": 1.0, "prompts": 2}


def test_disjoint_strings_score_zero():
    out = text_metrics(["alpha beta gamma delta"], ["one two three four"])
    assert out["rouge_l"] == 0.0 and out["bleu"] == 0.0 and out["exact_match"] == 0.0 and out["token_f1"] == 0.0


def test_rouge_l_by_hand():
    # LCS "the cat sat on the mat" = 6 tokens; precision 6/7, recall 6/6, F1 = 2PR/(P+R) = 12/13.
    assert rouge_l(["the cat sat on the mat today"], ["the cat sat on the mat"]) == pytest.approx(12 / 13)
    # Mean over pairs: (1 + 0) / 2.
    assert rouge_l(["same words", "nothing"], ["same words", "else"]) == pytest.approx(0.5)


def test_bleu_by_hand():
    # n-gram precisions 6/7, 5/6, 4/5, 3/4; the candidate is longer, so no brevity penalty.
    expected = 100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25
    assert bleu(["the cat sat on the mat today"], ["the cat sat on the mat"]) == pytest.approx(expected, rel=1e-6)
    # Corpus BLEU pools n-gram counts over sentences: 4/8, 3/6, 2/4, 1/2 -> 50.
    assert bleu(["a b c d", "w x y z"], ["a b c d", "e f g h"]) == pytest.approx(50.0)


def test_exact_match_normalises_whitespace_only():
    assert normalize("  the\tcat \n sat ") == "the cat sat"
    assert exact_match(["the  cat\n", "The cat", "dog"], ["the cat", "the cat", "dog"]) == pytest.approx(2 / 3)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_token_f1_by_hand():
    # "The cat sat." vs "a cat sat down": articles and punctuation go; 2 common of 2 predicted and 3 reference
    # tokens: precision 1, recall 2/3, F1 = 0.8.
    assert token_f1(["The cat sat."], ["a cat sat down"]) == pytest.approx(0.8)
    # Repeated tokens count once per occurrence on both sides: "x x y" vs "x y y" share x and y: 2/3 each.
    assert token_f1(["x x y"], ["x y y"]) == pytest.approx(2 / 3)
    # Mean over pairs; an answer of only articles is empty and agrees with an empty reference.
    assert token_f1(["same words", "the", "nothing"], ["same words", "", "else"]) == pytest.approx(2 / 3)
    assert token_f1(["", "words"], ["words", ""]) == 0.0
