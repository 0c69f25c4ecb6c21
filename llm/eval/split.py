"""Which records are held out for evaluation: one rule for documents (by content hash) and conversations
(by the hash of their messages), the same in every process, for the data stage, fine-tuning and compress."""

from __future__ import annotations

import hashlib
import json

import numpy as np


def stable_id(key: str) -> int:
    """A 63-bit id of a string that is the same in every process (Python's `hash` is salted)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "little") >> 1


def is_val(content_hash: np.ndarray, val_fraction: float) -> np.ndarray:
    """Deterministic split by document hash: the same document is always on the same side."""
    return (content_hash.astype(np.int64) % 1_000_000) < int(round(val_fraction * 1_000_000))


def is_held_out(messages: list[dict[str, str]], val_fraction: float) -> bool:
    """Whether a conversation is on the val side of the split (the data stage's SFT rule)."""
    return bool(is_val(np.array([stable_id(json.dumps(messages, sort_keys=True))]), val_fraction)[0])
