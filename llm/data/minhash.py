"""MinHash signatures and LSH banding, vectorized with numpy over whole batches of documents.

Shingles are word n-grams of the lower-cased text (whitespace-separated words). Hashing avoids a Python
loop per word or per permutation:
- word hashes come from one polynomial prefix hash over the batch's UTF-8 bytes (arithmetic mod 2^64, which
  numpy's uint64 does by wrapping; the multiplier is odd, hence invertible, so a word's hash does not depend
  on where it sits);
- a shingle hash combines its n word hashes the same way, then a 64-bit finalizer mixes the bits;
- all permutations at once: h_k(x) = (a_k * x + b_k) mod 2^32 (a_k odd) on the shingle hash's top 32 bits,
  a (shingles x num_perm) uint32 matrix reduced per document with `np.minimum.reduceat`.
"""

from __future__ import annotations

import numpy as np

_Q = np.uint64(0x100000001B3)  # odd multipliers: invertible mod 2^64
_R = np.uint64(0x9E3779B97F4A7C15)
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_ROWS_PER_CHUNK = 1 << 12  # shingles per (chunk x num_perm) matrix: 4k x 128 x 4 B = 2 MiB, cache-sized
EMPTY = np.uint32(0xFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_POWERS: dict[int, np.ndarray] = {}


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64, cached: every batch needs the same prefix of the same powers."""
    cached = _POWERS.get(int(base))
    if cached is None or len(cached) < n:
        p = np.full(max(n, 1 << 16, 2 * len(cached) if cached is not None else 0), base, dtype=np.uint64)
        p[0] = 1
        cached = _POWERS[int(base)] = np.cumprod(p, dtype=np.uint64)  # wraps mod 2^64, as intended
    return cached[:n]


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of `num_perm` hash functions h(x) = a x + b mod 2^32, a odd: each a bijection of the
    32-bit shingle hashes, which are already well mixed, so the minimum is as good as a random one's."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    return a, b


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word n-gram of every text, and each text's start offset into them.

    A text with fewer than `ngram` words has one shingle (all its words); an empty text has none.
    """
    lowered = [t.lower().encode("utf-8") for t in texts]
    blob = b" ".join(lowered)
    lengths = np.array([len(t) + 1 for t in lowered], dtype=np.int64)
    text_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    b = np.frombuffer(blob, dtype=np.uint8)
    space = _SPACE[b]
    prev_space = np.concatenate([[True], space[:-1]])
    next_space = np.concatenate([space[1:], [True]])
    starts = np.flatnonzero(~space & prev_space)
    ends = np.flatnonzero(~space & next_space) + 1
    prefix = np.concatenate([[np.uint64(0)], np.cumsum((b.astype(np.uint64) + np.uint64(1)) * _powers(_Q, len(b)),
                                                       dtype=np.uint64)])
    inv = np.uint64(pow(int(_Q), -1, 2**64))
    words = _mix((prefix[ends] - prefix[starts]) * _powers(inv, len(b) + 1)[starts])
    doc = np.searchsorted(text_start, starts, side="right") - 1
    counts = np.bincount(doc, minlength=len(texts))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = len(words)
    # Full n-grams: every start position whose n words lie in the same text. No masking needed there.
    pad = np.concatenate([words, np.zeros(ngram, dtype=np.uint64)])
    sh = pad[:n].copy()
    rj = np.uint64(1)
    for j in range(1, ngram):  # the n-gram size (~5): vectorized over all shingles of the batch
        rj = np.uint64((int(rj) * int(_R)) % 2**64)
        sh += pad[j:j + n] * rj
    pos = np.arange(n, dtype=np.int64) - first[doc]
    keep = pos + ngram <= counts[doc]
    # Texts with fewer than `ngram` words: one shingle of all their words (rare, so a short loop).
    for d in np.flatnonzero((counts > 0) & (counts < ngram)):
        w = words[first[d]:first[d] + counts[d]]
        sh[first[d]] = (w * _powers(_R, len(w))).sum(dtype=np.uint64)
        keep[first[d]] = True
    per_doc = np.where(counts >= ngram, counts - ngram + 1, np.minimum(counts, 1))
    offsets = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    return _mix(sh[keep]), offsets


def signatures(texts: list[str], *, num_perm: int, ngram: int, seed: int) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures; rows of empty texts are all 0xFFFFFFFF."""
    a, b = permutations(num_perm, seed)
    sh, offsets = shingle_hashes(texts, ngram)
    sig = np.full((len(texts), num_perm), EMPTY, dtype=np.uint32)
    ends = np.concatenate([offsets[1:], [len(sh)]])
    doc_of = np.repeat(np.arange(len(texts)), ends - offsets)
    x = (sh >> np.uint64(32)).astype(np.uint32)
    # Permutation-major (num_perm x chunk): the per-document minimum then runs along contiguous memory,
    # which numpy vectorizes; the shingle-major layout is ~5x slower for the same arithmetic.
    buf = np.empty((num_perm, _ROWS_PER_CHUNK), dtype=np.uint32)
    for lo in range(0, len(sh), _ROWS_PER_CHUNK):
        hi = min(lo + _ROWS_PER_CHUNK, len(sh))
        h = buf[:, : hi - lo]
        np.multiply(a[:, None], x[None, lo:hi], out=h)  # in place, 32-bit, cache-sized: the whole cost
        np.add(h, b[:, None], out=h)
        docs = doc_of[lo:hi]
        seg = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]]))
        mins = np.minimum.reduceat(h, seg, axis=1).T
        ids = docs[seg]
        sig[ids] = np.minimum(sig[ids], mins)
    return sig


def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.95) -> tuple[int, int]:
    """(bands, rows) with bands x rows <= num_perm that minimize the weighted false positive and false
    negative probability mass around `threshold` (datasketch's MinHashLSH rule; it weighs both 0.5).

    False negatives weigh 0.95 by default: every candidate pair is verified against the threshold
    afterwards, so a false positive costs only a comparison while a false negative is a duplicate kept.
    At threshold 0.8 and 128 permutations this gives 16 bands of 8 rows: a pair at Jaccard 0.8 shares a
    bucket with probability 0.95 (0.40 with equal weights)."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - s ** rows) ** bands
            fp = float(np.trapezoid(np.where(s <= threshold, p, 0.0), s))
            fn = float(np.trapezoid(np.where(s > threshold, 1.0 - p, 0.0), s))
            if (err := (1 - fn_weight) * fp + fn_weight * fn) < best_err:
                best, best_err = (bands, rows), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 bucket keys: documents share a key in band i iff their rows of band i are equal
    (up to 64-bit hash collisions). The band index is mixed in so that bands never share buckets."""
    x = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(np.uint64)
    key = (x * _powers(_R, rows)[None, None, :]).sum(axis=2, dtype=np.uint64)
    return _mix(key + np.arange(bands, dtype=np.uint64)[None, :] * _Q)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal MinHash values: an unbiased estimate of the Jaccard similarity."""
    return (sig_a == sig_b).mean(axis=-1)
