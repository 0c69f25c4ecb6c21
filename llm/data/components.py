"""Connected components of the near-duplicate graph as Ray tasks: alternating large-star / small-star rounds.

The graph (verified pairs of positions) never comes to the driver. Each round is a hash shuffle of edges
(`llm.data.shuffle`) by node: one task per partition sees every edge of its nodes and rewires them towards
the smallest node in reach (Kiveris et al., "Connected Components in MapReduce and Beyond", 2014):

- large-star: a node links each larger neighbour to the smallest node of its neighbourhood;
- small-star: a node links itself and each smaller neighbour to the smallest of them.

Their fixed point is a forest of stars, each centred on its component's smallest node, reached in
O(log n) rounds. A round changed nothing when the edge set entering large-star is the same as a round ago
(count and an order-free 64-bit hash, summed over tasks). Then every node larger than all its neighbours'
minimum is a duplicate of that minimum: each task writes those nodes, the positions to drop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm import storage
from llm.data import shuffle

MAX_ROUNDS = 100  # log2 of any corpus' cluster size is far below; a bug must not loop forever


def _groups(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Edges sorted by (u, v) without duplicates, each row's group start, and each group's minimum v."""
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    keep = np.concatenate([[True], (u[1:] != u[:-1]) | (v[1:] != v[:-1])]) if len(u) else np.zeros(0, bool)
    u, v = u[keep], v[keep]
    start = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]])) if len(u) else np.zeros(0, np.int64)
    group_min = v[start]  # sorted by v within a group: the first is the smallest
    return u, v, start, group_min


def large_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int], np.ndarray]:
    """Edges (u, v) with both directions present, grouped by u -> large-star edges, the input's digest, and
    the nodes that have a smaller neighbour (once converged: every node but the centres)."""
    u, v, start, vmin = _groups(u, v)
    m = np.repeat(np.minimum(u[start], vmin), np.diff(np.append(start, len(u))))
    out = v > u
    mixed = shuffle.partition_of(u * np.int64(0x2545F4914F6CDD1D) + v, 1 << 62) if len(u) else np.zeros(0, np.int64)
    digest = {"edges": len(u), "hash": int(mixed.sum(dtype=np.uint64)) if len(u) else 0,
              "nodes": len(start), "roots": int((u[start] < vmin).sum())}
    return v[out], m[out], digest, u[start][u[start] > vmin]


def small_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (u, v) oriented v < u, grouped by u -> small-star edges (self loops left out)."""
    u, v, start, vmin = _groups(u, v)
    m_of_group = np.minimum(u[start], vmin)
    m = np.repeat(m_of_group, np.diff(np.append(start, len(u))))
    a = np.concatenate([v, u[start]])
    b = np.concatenate([m, m_of_group])
    keep = a != b
    return a[keep], b[keep]


def _both_ways(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([np.concatenate([a, b]), np.concatenate([b, a])], axis=1)


def _oriented(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([np.maximum(a, b), np.minimum(a, b)], axis=1)


def large_star_task(src: str, dst: str, marks: str, p: int, n_parts: int) -> dict[str, int]:
    """Partition `p` of a round's large-star; also writes the nodes that are not their star's centre."""
    e = shuffle.read_part(src, p)
    a, b, digest, not_centre = large_star(e[:, 0], e[:, 1])
    shuffle.write_parts(storage.join(dst, f"{p:05d}"), _oriented(a, b), n_parts)
    shuffle.write_marks(storage.join(marks, f"{p:05d}"), not_centre)
    return digest


def small_star_task(src: str, dst: str, p: int, n_parts: int) -> int:
    """Partition `p` of a round's small-star; writes large-star's input for the next round."""
    e = shuffle.read_part(src, p)
    a, b = small_star(e[:, 0], e[:, 1])
    shuffle.write_parts(storage.join(dst, f"{p:05d}"), _both_ways(a, b), n_parts)
    return len(a)


def edge_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What verification writes for round 0's large-star: each verified pair in both directions."""
    return _both_ways(a, b)


def run(edges: str, work: str, n_parts: int, resources: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """Components of the graph written (`edge_rows`, `n_parts` partitions) under `edges`, as Ray tasks.

    Returns the folder of the mark files of every non-centre node (the duplicates to drop) and the counts:
    `pairs` (distinct verified pairs), `duplicates`, `clusters`, `rounds`.
    """
    import ray

    ls = ray.remote(**resources)(large_star_task)
    ss = ray.remote(**resources)(small_star_task)
    src, previous, pairs = edges, None, 0
    for r in range(MAX_ROUNDS):
        mid, nxt, marks = (storage.join(work, name) for name in (f"r{r}-ss", f"r{r + 1}-ls", f"r{r}-marks"))
        digests = ray.get([ls.remote(src, mid, marks, p, n_parts) for p in range(n_parts)])
        total = {k: sum(int(d[k]) for d in digests) for k in ("edges", "nodes", "roots")}
        total["hash"] = sum(int(d["hash"]) for d in digests) % (1 << 64)
        if r == 0:
            pairs = total["edges"] // 2  # verified pairs, both directions, duplicates removed
        if total == previous or total["edges"] == 0:
            return marks, {"pairs": pairs, "duplicates": total["nodes"] - total["roots"],
                           "clusters": total["roots"], "rounds": r}
        previous = total
        ray.get([ss.remote(mid, nxt, p, n_parts) for p in range(n_parts)])
        src = nxt
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds under {work}")
