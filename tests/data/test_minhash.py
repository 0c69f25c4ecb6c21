"""MinHash signatures and LSH parameters, without Ray."""

from __future__ import annotations

import random

import numpy as np

from llm.data import minhash

random.seed(0)
VOCAB = [f"word{i}" for i in range(3000)]


def doc(n: int = 200) -> str:
    return " ".join(random.choices(VOCAB, k=n))


def shingles(text: str, n: int = 5) -> set[str]:
    w = text.lower().split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {" ".join(w)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_signature_estimates_jaccard():
    base = doc(400)
    words = base.split()
    edited = " ".join(w if i % 40 else "changed" for i, w in enumerate(words))
    sig = minhash.signatures([base, edited, doc(400)], num_perm=256, ngram=5, seed=1)
    assert sig.shape == (3, 256) and sig.dtype == np.uint32
    true = jaccard(base, edited)
    assert abs(minhash.estimated_jaccard(sig[0], sig[1]) - true) < 0.08
    assert minhash.estimated_jaccard(sig[0], sig[2]) < 0.05


def test_signatures_case_whitespace_insensitive_and_batch_independent():
    a = "The  Quick brown fox\njumps over the lazy dog"
    b = "the quick brown fox jumps over the lazy dog"
    together = minhash.signatures([a, b, "short", ""], num_perm=64, ngram=5, seed=3)
    alone = minhash.signatures(["short"], num_perm=64, ngram=5, seed=3)
    assert (together[0] == together[1]).all()
    assert (together[2] == alone[0]).all()  # a text's signature does not depend on its batch neighbours
    assert (together[3] == minhash.EMPTY).all()
    assert not (together[2] == minhash.EMPTY).any()  # fewer words than ngram: one shingle, still a signature


def test_lsh_params_fit_num_perm():
    assert minhash.lsh_params(0.8, 128, fn_weight=0.5) == (9, 13)  # datasketch's MinHashLSH picks the same
    assert minhash.lsh_params(0.8, 128) == (16, 8)  # recall-weighted: candidates are verified afterwards
    for threshold, num_perm in [(0.5, 128), (0.7, 64), (0.8, 128), (0.9, 256)]:
        bands, rows = minhash.lsh_params(threshold, num_perm)
        equal_bands, equal_rows = minhash.lsh_params(threshold, num_perm, fn_weight=0.5)
        assert bands * rows <= num_perm and equal_bands * equal_rows <= num_perm
        # A pair right at the threshold shares a bucket far more often than with equal weights.
        recall = 1 - (1 - threshold**rows) ** bands
        assert recall > 0.85 and recall > 1.5 * (1 - (1 - threshold**equal_rows) ** equal_bands), threshold


def test_band_keys_equal_only_for_equal_bands():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [5, 5, 3, 4]], dtype=np.uint32)
    keys = minhash.band_keys(sig, 2, 2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert keys[0, 1] == keys[2, 1]  # same band, same rows (3, 4): one bucket
    assert keys[0, 1] == minhash.band_keys(np.array([[7, 7, 3, 4]], np.uint32), 2, 2)[0, 1]
    # Different band index: the same rows (3, 4) in band 0 are never band 1's bucket.
    assert minhash.band_keys(np.array([[3, 4, 7, 7]], np.uint32), 2, 2)[0, 0] != keys[0, 1]
