"""Dedup at scale: key-only shuffle, block-split buckets and star-contraction components against the plain
in-memory algorithm (LSH buckets with signatures, every pair verified, union-find) on a planted corpus."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.config.data import FuzzyDedupConfig
from llm.data import components, dedup, minhash, shuffle
from llm.data.clean import content_hash

VOCAB = [f"w{i}" for i in range(3000)]


def union_find_drops(pairs: list[tuple[int, int]]) -> set[int]:
    """Every node but the smallest of its component: the reference."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x for x in parent if find(x) != x}


def test_star_contraction_finds_union_find_components():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(2, 50))
        a, b = rng.integers(0, n, 40), rng.integers(0, n, 40)
        if trial % 4 == 0:  # a long path: the most rounds
            perm = rng.permutation(n)
            a, b = perm[:-1], perm[1:]
        a, b = a[a != b] * 5 + 1, b[a != b] * 5 + 1
        e, previous = components.edge_rows(a, b), None
        for _ in range(components.MAX_ROUNDS):
            x, y, digest, not_centre = components.large_star(e[:, 0], e[:, 1])
            if digest == previous:
                break
            previous = digest
            o = components._oriented(x, y)
            e = components._both_ways(*components.small_star(o[:, 0], o[:, 1]))
        assert set(not_centre.tolist()) == union_find_drops(list(zip(a.tolist(), b.tolist(), strict=True)))


def test_oversized_bucket_is_split_not_truncated():
    bucket = np.arange(10, 20)
    whole = set(zip(*(x.tolist() for x in dedup.bucket_pairs([bucket], block=64)), strict=True))
    split = set(zip(*(x.tolist() for x in dedup.bucket_pairs([bucket], block=3)), strict=True))
    assert whole == split and len(split) == 45  # every pair, each once


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """3 cleaned units: random documents, a few dropped rows, exact copies, and clusters of 1-word edits."""
    rng = random.Random(3)
    docs = [[rng.choice(VOCAB) for _ in range(150)] for _ in range(60)]
    units: list[list[tuple[str, str]]] = [[], [], []]
    for i, d in enumerate(docs):
        units[i % 3].append((" ".join(d), ""))
    planted_near = []
    for i in range(0, 24, 3):  # 8 clusters of base + 3 edits, the edits in later units
        for k in range(3):
            edit = list(docs[i])
            edit[10 + 40 * k] = "changed"
            units[min(2, i % 3 + 1)].append((" ".join(edit), ""))
            planted_near.append((min(2, i % 3 + 1), len(units[min(2, i % 3 + 1)])))  # +1: the row inserted below
    units[2].append((" ".join(docs[30]).upper(), ""))  # an exact copy after normalization
    for u in units:
        u.insert(1, ("", "too_short"))
    root = tmp_path_factory.mktemp("clean")
    paths = []
    for n, rows in enumerate(units):
        path = root / f"{n:06d}.parquet"
        texts = [t for t, _ in rows]
        pq.write_table(pa.table({"text": texts, "reason": [r for _, r in rows],
                                 "content_hash": [content_hash(t) if not r else 0 for t, r in rows]}), path)
        sig = minhash.signatures(texts, num_perm=128, ngram=5, seed=42)
        sig[[i for i, (_, r) in enumerate(rows) if r]] = minhash.EMPTY
        sig.tofile(dedup.sig_path(str(path)))
        paths.append(str(path))
    return paths, units, planted_near


def reference(units, threshold=0.8, num_perm=128) -> tuple[set[int], set[int]]:
    """Exact duplicates, then the old in-memory fuzzy dedup (signatures in the buckets), by position."""
    pos, texts = [], []
    for u, rows in enumerate(units):
        for r, (t, reason) in enumerate(rows):
            if not reason:
                pos.append(int(shuffle.position(u, np.array([r]))[0]))
                texts.append(t)
    first: dict[int, int] = {}
    exact = set()
    for p, t in zip(pos, texts, strict=True):
        h = content_hash(t)
        (exact.add(p) if h in first else first.setdefault(h, p))
    keep = [i for i, p in enumerate(pos) if p not in exact]
    sig = minhash.signatures([texts[i] for i in keep], num_perm=num_perm, ngram=5, seed=42)
    bands, rows = minhash.lsh_params(threshold, num_perm)
    buckets: dict[int, list[int]] = {}
    for i, keys in enumerate(minhash.band_keys(sig, bands, rows)):
        for k in keys.tolist():
            buckets.setdefault(k, []).append(i)
    pairs = {(pos[keep[a]], pos[keep[b]]) for m in buckets.values() for x, a in enumerate(m) for b in m[x + 1:]
             if minhash.estimated_jaccard(sig[a], sig[b]) >= threshold}
    return exact, union_find_drops(list(pairs))


@pytest.mark.ray
@pytest.mark.parametrize("block", [dedup.BLOCK, 2])  # 2: every bucket of 3+ members is split into blocks
def test_key_only_shuffle_keeps_recall(ray_session, planted, tmp_path, block):
    paths, units, planted_near = planted
    marks, stats = dedup.run(paths, str(tmp_path / "work"), documents=sum(map(len, units)), exact=True,
                             fuzzy=FuzzyDedupConfig(), cpus=2, block=block)
    found = {int(shuffle.position(u, np.array([r]))[0]) for u in range(3)
             for r in shuffle.marks_of_unit(marks, u).tolist()}
    exact, fuzzy = reference(units)
    assert len(exact) == 1 and stats["exact_duplicates"] == 1
    assert found == exact | fuzzy  # the same documents as the in-memory algorithm with signatures in buckets
    assert {int(shuffle.position(u, np.array([r]))[0]) for u, r in planted_near} <= found  # every planted edit
    assert stats["fuzzy_duplicates"] == len(fuzzy) == 24 and stats["fuzzy_clusters"] == 8
    # Only keys crossed the shuffle: 16-byte rows, one per document and band.
    bands, _ = minhash.lsh_params(0.8, 128)
    shuffled = sum(f.stat().st_size for f in (tmp_path / "work" / "band-keys").glob("??????"))
    assert shuffled == stats["fuzzy_documents"] * bands * 16
