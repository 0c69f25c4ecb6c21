"""`storage.fingerprint` on an object store (issue 20, part 3): a glob is matched per path segment, and an
object written again changes the fingerprint (same size: by its time); the moto S3 server, no Ray."""

from __future__ import annotations

import time

from llm import storage


def test_an_s3_glob_is_fingerprinted_per_segment(s3_prefix: str) -> None:
    storage.write_text(f"{s3_prefix}/corpus/a.jsonl", '{"text": "one"}\n')
    storage.write_text(f"{s3_prefix}/corpus/sub/b.jsonl", '{"text": "not matched: another segment"}\n')
    storage.write_text(f"{s3_prefix}/corpus/c.txt", "not matched")
    before = storage.fingerprint(f"{s3_prefix}/corpus/*.jsonl")
    assert before.startswith("1 files, 16 bytes")
    assert storage.fingerprint(f"{s3_prefix}/corpus").startswith("3 files")
    assert storage.fingerprint(f"{s3_prefix}/nothing/*.jsonl") == "missing"
    time.sleep(1.1)  # S3's modification times have a one-second grain
    storage.write_text(f"{s3_prefix}/corpus/a.jsonl", '{"text": "two"}\n')
    assert storage.fingerprint(f"{s3_prefix}/corpus/*.jsonl") != before
