"""Exact and fuzzy deduplication over the cleaned corpus; both return the doc ids to drop.

Exact: among kept documents with the same normalized-content hash, the smallest doc id survives (a doc id
is a hash of `file:line`, so the survivor does not depend on scheduling).

Fuzzy: MinHash signatures (computed while cleaning) are cut into LSH bands; Ray Data groups documents by
band bucket and, inside each bucket, keeps the pairs whose estimated Jaccard reaches the threshold (this
check is what keeps precision high: a shared bucket alone is only a candidate). The pairs come back to the
driver as integers, connected components join them into clusters, and each cluster keeps its smallest id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.data import minhash

_MAX_BUCKET = 2000  # beyond this, a bucket is compared against its first member only (O(n) not O(n^2))


def exact_duplicates(doc_ids: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Doc ids whose content hash belongs to a smaller doc id too."""
    order = np.lexsort((doc_ids, hashes))
    h = hashes[order]
    dup = np.concatenate([[False], h[1:] == h[:-1]])
    return np.sort(doc_ids[order][dup])


def kept_rows(batch: dict[str, np.ndarray], *, drop: np.ndarray) -> dict[str, np.ndarray]:
    """Ray Data UDF: the rows not dropped by a filter (empty reason) nor listed in `drop`."""
    keep = (batch["reason"] == "") & ~np.isin(batch["doc_id"], drop)
    return {"doc_id": batch["doc_id"][keep], "sig": batch["sig"][keep]}


def bucket_rows(batch: dict[str, Any], *, bands: int, rows: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: one row per (document, band) with the band's bucket key and the full signature."""
    sig = np.asarray(batch["sig"]).astype(np.uint32)
    if sig.ndim == 1:  # an empty batch or object array of lists
        sig = np.stack(list(sig)) if len(sig) else np.zeros((0, bands * rows), np.uint32)
    keys = minhash.band_keys(sig, bands, rows)
    return {"key": keys.ravel().view(np.int64), "doc_id": np.repeat(np.asarray(batch["doc_id"]), bands),
            "sig": np.repeat(sig, bands, axis=0)}


def pairs_in_bucket(ids: np.ndarray, sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) doc-id pairs of one bucket whose estimated Jaccard is at least `threshold`."""
    if len(ids) > _MAX_BUCKET:
        est = minhash.estimated_jaccard(sig[:1], sig[1:])
        keep = np.flatnonzero(est >= threshold) + 1
        return np.full(len(keep), ids[0]), ids[keep]
    i, j = np.triu_indices(len(ids), k=1)
    est = minhash.estimated_jaccard(sig[i], sig[j])
    ok = est >= threshold
    return ids[i[ok]], ids[j[ok]]


def verify_bucket(group: dict[str, Any], *, threshold: float) -> dict[str, np.ndarray]:
    """Ray Data `map_groups` UDF: the verified pairs of one bucket."""
    ids = np.asarray(group["doc_id"], dtype=np.int64)
    if len(ids) < 2:
        return {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64)}
    sig = np.asarray(group["sig"])
    sig = np.stack(list(sig)) if sig.ndim == 1 else sig
    a, b = pairs_in_bucket(ids, sig, threshold)
    return {"a": a.astype(np.int64), "b": b.astype(np.int64)}


def candidate_pairs(ds: Any, *, threshold: float, num_perm: int) -> np.ndarray:
    """(n, 2) verified near-duplicate pairs of a Ray Dataset with `doc_id` and `sig` columns."""
    bands, rows = minhash.lsh_params(threshold, num_perm)
    buckets = ds.map_batches(bucket_rows, fn_kwargs={"bands": bands, "rows": rows}, batch_format="numpy")
    pairs = buckets.groupby("key").map_groups(verify_bucket, fn_kwargs={"threshold": threshold},
                                              batch_format="numpy")
    out = [np.stack([b["a"], b["b"]], axis=1) for b in pairs.iter_batches(batch_format="numpy", batch_size=None)
           if len(b["a"])]
    if not out:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.sort(np.concatenate(out), axis=1), axis=0)


def components(pairs: np.ndarray) -> dict[int, list[int]]:
    """Connected components of the pair graph (union-find): smallest id -> sorted members (size >= 2)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the smaller id is always the root: the survivor
    clusters: dict[int, list[int]] = {}
    for x in list(parent):
        clusters.setdefault(find(x), []).append(x)
    return {root: sorted({root, *members}) for root, members in clusters.items()}


def fuzzy_duplicates(ds: Any, *, threshold: float, num_perm: int) -> tuple[np.ndarray, int, int]:
    """Doc ids to drop (every cluster member but its smallest id), the cluster count and the pair count."""
    pairs = candidate_pairs(ds, threshold=threshold, num_perm=num_perm)
    clusters = components(pairs)
    drop = [m for root, members in clusters.items() for m in members if m != root]
    return np.array(sorted(drop), dtype=np.int64), len(clusters), len(pairs)
