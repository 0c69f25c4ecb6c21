"""Exact and fuzzy deduplication of the cleaned units as Ray tasks; both write the positions to drop.

Nothing per document reaches the driver: it starts tasks over folders and sums their counts. Rows move
through the file shuffle of `llm.data.shuffle` (16 bytes each) and documents are named by position
(`unit << 32 | row`), so the survivor of every group is the first occurrence in corpus order, whatever
the scheduling or the number of units.

Exact: (content hash, position) rows shuffled by hash; a reducer marks every position but the first of a hash.

Fuzzy: MinHash signatures stay where cleaning wrote them (`<unit>.sig`, fixed-width rows). Band tasks
shuffle only (band key, position) rows; a reducer sorts its keys into buckets, reads the signatures of the
documents in buckets of two or more (candidates, usually few) straight from the signature files, and keeps
the pairs whose estimated Jaccard reaches the threshold (a shared bucket alone is only a candidate). A
bucket larger than `block` is compared block against block, every pair still checked: recall does not
depend on bucket size. Connected components of the verified pairs run as Ray tasks too
(`llm.data.components`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm import storage
from llm.data import components, minhash, shuffle

BLOCK = 256  # members compared at once in a large bucket: block x block x num_perm bytes (8 MiB at 128)
_ROWS_PER_PART = 1 << 21  # shuffle rows per reducer (32 MiB): more data, more reducers, same memory each
_CHUNK = 1 << 16  # documents hashed into band keys at once
_CELLS = 1 << 24  # pair x permutation cells compared at once (16 MiB of booleans)
_TASK: dict[str, Any] = {"num_cpus": 1}


@dataclass(frozen=True)
class Lsh:
    """The fuzzy pass's shape, the same for its band map and verify reduce tasks."""

    bands: int
    rows: int
    """Signature values per band."""
    num_perm: int
    """Signature width (MinHash permutations)."""
    threshold: float
    """Estimated Jaccard a candidate pair must reach."""
    block: int = BLOCK
    """Bucket members compared at once (larger buckets are split, never truncated)."""


def sig_path(clean_path: str) -> str:
    """The signature file beside a cleaned unit file: (rows, num_perm) uint32, raw, one row per parquet row."""
    return clean_path.removesuffix(".parquet") + ".sig"


def read_column(uri: str, name: str) -> Any:
    """One column of a parquet file, local or in an object store."""
    fs, path = storage.resolve(uri)
    return pq.read_table(path, columns=[name], filesystem=fs).column(name)


def kept_rows(clean_path: str, unit: int, marks: list[str]) -> np.ndarray:
    """Rows of a unit that passed the filters and are not marked for dropping (sorted)."""
    rows = np.flatnonzero(pc.equal(read_column(clean_path, "reason"), "").to_numpy(zero_copy_only=False))
    dropped = shuffle.marks_of_unit(marks, unit)
    return rows[~np.isin(rows, dropped, assume_unique=True)] if len(dropped) else rows


def exact_map(clean_path: str, unit: int, out: str, n_parts: int) -> int:
    """(content hash, position) of the unit's kept documents, shuffled by hash."""
    rows = kept_rows(clean_path, unit, [])
    h = read_column(clean_path, "content_hash").to_numpy()[rows]
    shuffle.write_parts(storage.join(out, f"{unit:06d}"), np.stack([h, shuffle.position(unit, rows)], axis=1),
                        n_parts)
    return len(rows)


def exact_reduce(src: str, marks: str, p: int) -> int:
    """Mark every position but the smallest of each content hash; returns how many."""
    e = shuffle.read_part(src, p)
    e = e[np.lexsort((e[:, 1], e[:, 0]))]
    dup = np.concatenate([[False], e[1:, 0] == e[:-1, 0]]) if len(e) else np.zeros(0, bool)
    shuffle.write_marks(storage.join(marks, f"{p:05d}"), e[dup, 1])
    return int(dup.sum())


def band_map(clean_path: str, unit: int, marks: list[str], out: str, n_parts: int, lsh: Lsh) -> int:
    """(band key, position) of the unit's kept, not exact-duplicate documents, shuffled by key; no signature."""
    kept = kept_rows(clean_path, unit, marks)
    parts = []
    for lo in range(0, len(kept), _CHUNK):
        r = kept[lo:lo + _CHUNK]
        sig = shuffle.take(sig_path(clean_path), np.uint32, lsh.num_perm, r)
        keys = minhash.band_keys(sig, lsh.bands, lsh.rows).view(np.int64)
        parts.append(np.stack([keys.ravel(), np.repeat(shuffle.position(unit, r), lsh.bands)], axis=1))
    shuffle.write_parts(storage.join(out, f"{unit:06d}"), np.concatenate(parts) if parts else np.zeros((0, 2)),
                        n_parts)
    return len(kept)


def _signatures_of(positions: np.ndarray, clean_dir: str, num_perm: int) -> np.ndarray:
    """Signature rows of sorted `positions`, read from their units' files."""
    out = np.empty((len(positions), num_perm), np.uint32)
    units = positions >> shuffle.ROW_BITS
    for u in np.unique(units):
        at = np.flatnonzero(units == u)
        out[at] = shuffle.take(storage.join(clean_dir, f"{int(u):06d}.sig"), np.uint32, num_perm,
                               positions[at] & shuffle.ROW_MASK)
    return out


def _similar(sig: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """Which index pairs (a[i], b[i]) of `sig` reach `threshold` estimated Jaccard, in bounded chunks."""
    step = max(1, _CELLS // sig.shape[1])
    return np.concatenate([minhash.estimated_jaccard(sig[a[i:i + step]], sig[b[i:i + step]]) >= threshold
                           for i in range(0, len(a), step)]) if len(a) else np.zeros(0, bool)


def bucket_pairs(members: list[np.ndarray], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Every index pair (i < j) inside each bucket (arrays of member indices), vectorized per bucket size;
    a bucket over `block` members is cut into blocks and every block pair is enumerated (nothing truncated)."""
    a, b = [], []
    by_size: dict[int, list[np.ndarray]] = {}
    for m in members:
        if len(m) <= block:
            by_size.setdefault(len(m), []).append(m)
            continue
        cuts = [m[i:i + block] for i in range(0, len(m), block)]
        for x, bx in enumerate(cuts):
            for by in cuts[x:]:
                i, j = np.triu_indices(len(bx), k=1) if by is bx else np.indices((len(bx), len(by))).reshape(2, -1)
                a.append(bx[i])
                b.append(by[j])
    for size, group in by_size.items():
        mat = np.stack(group)
        i, j = np.triu_indices(size, k=1)
        a.append(mat[:, i].ravel())
        b.append(mat[:, j].ravel())
    return (np.concatenate(a), np.concatenate(b)) if a else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def verify_reduce(src: str, clean_dir: str, edges: str, p: int, n_parts: int, lsh: Lsh) -> dict[str, int]:
    """Buckets of partition `p` to verified pairs of positions, written as components' round-0 edges."""
    e = shuffle.read_part(src, p)
    e = e[np.lexsort((e[:, 1], e[:, 0]))]
    start = np.flatnonzero(np.concatenate([[True], e[1:, 0] != e[:-1, 0]])) if len(e) else np.zeros(0, np.int64)
    size = np.diff(np.append(start, len(e)))
    multi = size >= 2
    cand = np.unique(e[np.repeat(multi, size), 1])
    index = np.searchsorted(cand, e[:, 1])  # a row's candidate index (meaningful in multi-member buckets)
    members = [index[s:s + n] for s, n in zip(start[multi], size[multi], strict=True)]
    i, j = bucket_pairs(members, lsh.block)
    ok = _similar(_signatures_of(cand, clean_dir, lsh.num_perm), i, j, lsh.threshold) if len(i) else i.astype(bool)
    a, b = cand[i[ok]], cand[j[ok]]
    shuffle.write_parts(storage.join(edges, f"{p:05d}"), components.edge_rows(a, b), n_parts)
    return {"buckets": int(multi.sum()), "candidates": len(cand), "compared": len(i), "verified": len(a)}


def _parts(rows: int, cpus: int) -> int:
    return max(cpus, math.ceil(rows / _ROWS_PER_PART))


def run(clean_paths: list[str], work: str, *, documents: int, exact: bool, fuzzy: Any, cpus: int,
        block: int = BLOCK) -> tuple[list[str], dict[str, int]]:
    """Dedup the cleaned units `clean_paths` (unit i is `clean_paths[i]`) with Ray tasks under `work`.

    Args:
        clean_paths: the cleaned unit files in unit order; their `.sig` files beside them.
        work: an empty scratch folder.
        documents: rows of all units together (sizes the shuffles: memory per reducer stays bounded).
        exact: drop documents whose normalized content repeats an earlier one.
        fuzzy: `FuzzyDedupConfig`; near duplicates (MinHash-LSH, verified) when `fuzzy.enabled`.
        cpus: CPUs the tasks spread over (at least one reducer each).
        block: bucket members compared at once (larger buckets are split, never truncated); a knob for tests,
            which split small buckets to exercise the block path (hence a seventh parameter).

    Returns:
        The folders of mark files (positions to drop, see `shuffle.marks_of_unit`) and the counts.
    """
    import ray

    stats = {"exact_duplicates": 0, "fuzzy_duplicates": 0, "fuzzy_clusters": 0, "fuzzy_pairs": 0,
             "fuzzy_documents": 0, "fuzzy_candidates": 0}
    marks: list[str] = []
    units = list(enumerate(clean_paths))
    if exact:
        rows_dir, marks_dir = storage.join(work, "exact-rows"), storage.join(work, "exact-marks")
        n_parts = _parts(documents, cpus)
        mapper: Any = ray.remote(**_TASK)(exact_map)
        reducer: Any = ray.remote(**_TASK)(exact_reduce)
        ray.get([mapper.remote(path, u, rows_dir, n_parts) for u, path in units])
        stats["exact_duplicates"] = sum(ray.get([reducer.remote(rows_dir, marks_dir, p)
                                                 for p in range(n_parts)]))
        marks.append(marks_dir)
    if fuzzy.enabled:
        lsh = Lsh(*minhash.lsh_params(fuzzy.threshold, fuzzy.num_perm), fuzzy.num_perm, fuzzy.threshold, block)
        keys_dir, edges_dir = storage.join(work, "band-keys"), storage.join(work, "edges")
        n_parts = _parts(documents * lsh.bands, cpus)
        mapper = ray.remote(**_TASK)(band_map)
        reducer = ray.remote(**_TASK)(verify_reduce)
        stats["fuzzy_documents"] = sum(ray.get([mapper.remote(path, u, marks, keys_dir, n_parts, lsh)
                                                for u, path in units]))
        clean_dir = clean_paths[0].rsplit("/", 1)[0] if clean_paths else ""
        verified = ray.get([reducer.remote(keys_dir, clean_dir, edges_dir, p, n_parts, lsh) for p in range(n_parts)])
        stats["fuzzy_candidates"] = sum(v["candidates"] for v in verified)
        fuzzy_marks, cc = components.run(edges_dir, storage.join(work, "components"), n_parts, _TASK)
        stats.update(fuzzy_duplicates=cc["duplicates"], fuzzy_clusters=cc["clusters"], fuzzy_pairs=cc["pairs"])
        marks.append(fuzzy_marks)
    return marks, stats
