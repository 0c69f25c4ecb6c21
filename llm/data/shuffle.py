"""A file-based hash shuffle of integer rows, and sets of document positions, for dedup at scale.

Dedup moves only 16-byte rows: (content hash, position), (band key, position) and (node, node) edges. A
map task writes its rows once, grouped by reducer, into a *grouped file*: `<name>` holds the int64 rows,
raw, and `<name>.off` the group offsets; reducer `p` reads its slice of every map file (a memory map on a
local or shared disk, one ranged read on an object store). The driver only passes folder names and gets
counts back: no row travels through it, and no result that grows with the corpus sits in its object
store (Ray keeps small task returns in the driver's own process).

A document's *position* is `unit << 32 | row`: its cleaned unit file and its row there. Units are contiguous
runs of the sources in order, so positions sort in corpus order whatever the unit count, and a survivor
chosen as "the smallest position" is the first occurrence in the corpus. Sets of positions (the documents
to drop) are grouped files too, grouped by unit, so a task reads only its own unit's slice.
"""

from __future__ import annotations

import numpy as np

from llm import storage

ROW_BITS = 32
ROW_MASK = np.int64((1 << ROW_BITS) - 1)


def position(unit: int, rows: np.ndarray) -> np.ndarray:
    """Positions of rows `rows` of cleaned unit `unit`."""
    return (np.int64(unit) << np.int64(ROW_BITS)) | rows.astype(np.int64)


def partition_of(values: np.ndarray, n_parts: int) -> np.ndarray:
    """The reducer of each value: a mixed hash, so that clustered values (positions) spread evenly."""
    x = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(29)
    return (x % np.uint64(n_parts)).astype(np.int64)


def save(uri: str, arr: np.ndarray) -> None:
    """Write an array's raw bytes (scratch: no fsync locally, one PUT on an object store)."""
    storage.write_scratch(uri, np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def load(uri: str, dtype: type, width: int = 1) -> np.ndarray:
    """A raw array of rows of `width` values: memory-mapped locally, read whole from an object store."""
    flat: np.ndarray = np.frombuffer(storage.map_file(uri), dtype=dtype)
    return flat.reshape(-1, width) if width > 1 else flat


def take(uri: str, dtype: type, width: int, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted) of a raw array: near rows come in one read (`storage.read_gap`), so on an object
    store rows far apart cost a ranged read each and on a disk all of them are one slice of a memory map."""
    item = np.dtype(dtype).itemsize * width
    breaks = np.flatnonzero(np.diff(rows) * item > storage.read_gap(uri)) + 1
    runs = [run for run in np.split(np.arange(len(rows)), breaks) if len(run)]
    spans = [(int(rows[run[0]]), int(rows[run[-1]]) + 1) for run in runs]
    raws = storage.read_ranges(uri, [(a * item, b * item) for a, b in spans])
    parts = [np.frombuffer(raw, dtype=dtype).reshape(-1, width)[rows[run] - lo]
             for run, (lo, _hi), raw in zip(runs, spans, raws, strict=True)]
    out: np.ndarray = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty((0, width), dtype)
    return out if width > 1 else out[:, 0]


def write_grouped(uri: str, rows: np.ndarray, group: np.ndarray, n_groups: int) -> None:
    """Write int64 `rows` ordered by `group` (0 .. n_groups-1), with the group offsets beside them."""
    order = np.argsort(group, kind="stable")
    save(uri, np.asarray(rows, dtype=np.int64)[order])
    save(uri + ".off", np.searchsorted(group[order], np.arange(n_groups + 1)).astype(np.int64))


def read_group(folder: str, g: int, width: int) -> np.ndarray:
    """Group `g` of every grouped file in `folder`, concatenated: (m, width) int64 rows ((m,) if width 1)."""
    out = []
    for rel in sorted(storage.list_files(folder)):
        if not rel.endswith(".off") or "/" in rel:
            continue
        off = load(storage.join(folder, rel), np.int64)
        if g + 1 < len(off) and off[g + 1] > off[g]:
            [raw] = storage.read_ranges(storage.join(folder, rel.removesuffix(".off")),
                                        [(int(off[g]) * 8 * width, int(off[g + 1]) * 8 * width)])
            rows = np.frombuffer(raw, dtype=np.int64)  # a view of a memory map or of the bytes read: copied
            out.append(np.array(rows.reshape(-1, width) if width > 1 else rows))
    shape = (0, width) if width > 1 else (0,)
    return np.concatenate(out) if out else np.zeros(shape, np.int64)


def write_parts(uri: str, pairs: np.ndarray, n_parts: int) -> None:
    """Shuffle output: (n, 2) int64 `pairs` grouped by the reducer of their first column."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    write_grouped(uri, pairs, partition_of(pairs[:, 0], n_parts), n_parts)


def read_part(folder: str, p: int) -> np.ndarray:
    """Reducer `p`'s (m, 2) rows from every map file in `folder`."""
    return read_group(folder, p, 2)


def write_marks(uri: str, positions: np.ndarray) -> None:
    """A set of positions (documents to drop), grouped by unit for `marks_of_unit`."""
    marks = np.unique(np.asarray(positions, dtype=np.int64))
    units = marks >> np.int64(ROW_BITS)
    write_grouped(uri, marks, units, int(units.max()) + 1 if len(units) else 0)


def marks_of_unit(folders: list[str], unit: int) -> np.ndarray:
    """The sorted rows of `unit` marked in any mark file of `folders`."""
    found = [read_group(f, unit, 1) & ROW_MASK for f in folders]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
