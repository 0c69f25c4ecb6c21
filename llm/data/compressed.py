"""Decompression with a cap: a gzip stream that stops once it inflates past a ratio of its compressed size.

Text compresses 3-10x with gzip, very repetitive logs a few tens of times; a deflate bomb reaches ~1000x
(a megabyte that inflates to a gigabyte). Past a free allowance (small repetitive files are fine), output
beyond `MAX_INFLATE_RATIO` times the compressed bytes read so far raises `InflateLimit`, which the readers
turn into a `read_error` naming the file.
"""

from __future__ import annotations

import gzip
import io
from typing import Any, BinaryIO

MAX_INFLATE_RATIO = 100
FREE_INFLATE_BYTES = 64 << 20


class InflateLimit(ValueError):
    """A compressed file that inflates past `MAX_INFLATE_RATIO` times its size: a bomb, or not worth reading."""


class _Counted:
    """A compressed stream that counts the bytes read from it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.n = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.n += len(data)
        return data


class CappedGzip(io.RawIOBase):
    """A gzip stream that raises `InflateLimit` once its output passes the cap (see `MAX_INFLATE_RATIO`)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._src = _Counted(raw)
        self._gz = gzip.GzipFile(fileobj=self._src, mode="rb")  # type: ignore[call-overload]
        self.inflated = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        # What is there, in small steps: a truncated stream still yields the lines before the cut, and the cap is
        # checked every 64 KiB (8 KiB of a bomb could inflate to 8 MiB in one call).
        data = self._gz.read1(min(len(b), 1 << 16))
        self.inflated += len(data)
        if self.inflated > max(FREE_INFLATE_BYTES, MAX_INFLATE_RATIO * self._src.n):
            raise InflateLimit(f"decompression capped: inflates past {MAX_INFLATE_RATIO}x its compressed size "
                               f"(stopped after {self.inflated >> 20} MiB from {self._src.n >> 10} KiB)")
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._gz.close()
            self._raw.close()
        super().close()
