"""The data stage end to end on a real local Ray: planted duplicates, bad files, PII, packing, SFT, manifest."""

from __future__ import annotations

import glob
import gzip
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm.data.stage import run
from llm.data.tokenizer import load_tokenizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray

WORDS = ("river mountain garden window letter summer winter morning evening silver golden quiet gentle "
         "forest meadow harbor village castle bridge market street lantern candle mirror shadow thunder "
         "whisper journey traveler painter teacher student doctor farmer sailor keeper").split()


def prose(rng: random.Random, n: int = 120) -> str:
    sentences = []
    while sum(len(s.split()) for s in sentences) < n:
        sentences.append(" ".join(rng.choices(WORDS, k=rng.randint(6, 12))).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("corpus")
    docs = [prose(rng) for _ in range(40)]
    base = docs[0]
    words = base.split()
    near = " ".join(w if i != 60 else "lighthouse" for i, w in enumerate(words))  # one word changed: J ~ 0.96
    exact = "  " + base.upper() + "\n"  # same normalized content as docs[0]
    pii = docs[1] + " Contact the keeper at keeper@harbor.example or 415-555-2671."
    good = [{"text": d} for d in [*docs[2:], near, pii]]
    with open(root / "good.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in good))
        f.write('{"text": "broken json\n')  # malformed line: dropped with file:line
    (root / "base.txt").write_text(base)
    (root / "exact.txt").write_text(exact)
    (root / "empty.txt").write_text("")
    (root / "utf8.jsonl").write_bytes(b'{"text": "' + prose(rng).encode() + b' caf\xff"}\n')
    (root / "long.jsonl").write_text(json.dumps({"text": "x" * 20_000}) + "\n" + json.dumps({"text": prose(rng)}))
    blob = gzip.compress("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(200)).encode())
    (root / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (root / "sft").mkdir()
    (root / "sft" / "cut.jsonl.gz").write_bytes(blob[:12])  # the gzip header, then nothing: no record read
    sft = root / "sft" / "chat.jsonl"
    sft.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Name a river."}, {"role": "assistant",
                                                                                 "content": "The Nile."}]}) + "\n"
        + "".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(30))
        + "not json\n")
    return root, {"base": base, "near": near, "distinct": docs[2:]}


def _busy_unit(batch):
    import os
    import time

    start = time.time()
    while time.time() - start < 1.5:
        pass
    return {"unit": batch["unit"], "start": [start], "end": [time.time()], "pid": [os.getpid()]}


def test_units_run_concurrently(ray_session):
    """As many units as CPUs must run side by side: Ray Data's per-operator reservation starts its budget at
    zero CPUs and ran them one after another (`map_units` turns it off for unit jobs only)."""
    from ray.data import DataContext

    from llm.data.stage import map_units

    rows = map_units([{"unit": i} for i in range(2)], _busy_unit, {})
    assert sorted(r["unit"] for r in rows) == [0, 1] and len({r["pid"] for r in rows}) == 2
    first, second = sorted(rows, key=lambda r: r["start"])
    assert second["start"] < first["end"], "the two units ran one after another"
    assert DataContext.get_current().op_resource_reservation_enabled  # restored for other pipelines


def test_stage_end_to_end(ray_session, corpus, tmp_path, capsys):
    root, texts = corpus
    overrides = [f"data.sources=[{root}/*.txt, {root}/*.jsonl, {root}/*.jsonl.gz]",
                 f"data.sft.sources=[{root}/sft/*.jsonl, {root}/sft/*.jsonl.gz]",
                 "data.min_chars=50", "data.max_chars=5000", "data.seq_len=16", "data.val_fraction=0.2",
                 "data.tokenizer.vocab_size=320", "data.keep_dropped=true", "data.sft.val_fraction=0.2"]
    cfg = tiny_config(tmp_path, *overrides).llm
    result = run(cfg)
    m = result.metrics
    assert not result.skipped
    printed = capsys.readouterr().out
    assert "documents in" in printed
    d = m["dropped"]
    assert (d["bad_json"], d["empty_file"], d["read_error"], d["too_long"]) == (1, 1, 1, 1), d
    # Each file that failed to read is named with its error, the data source's and the SFT source's alike.
    truncated = "truncated gzip stream (Compressed file ended before the end-of-stream marker was reached)"
    unreadable = [{"file": f"{root}/cut.jsonl.gz", "error": truncated},
                  {"file": f"{root}/sft/cut.jsonl.gz", "error": truncated}]
    assert m["read_errors"] == unreadable and m["sft"]["dropped_read_error"] == 1
    lines = printed.splitlines()
    assert "  unreadable files               2" in lines
    assert f"    {root}/cut.jsonl.gz: {truncated}" in lines and f"    {root}/sft/cut.jsonl.gz: {truncated}" in lines
    assert m["utf8_replacements"] == 1
    # Normalization changed one document: exact.txt's trailing newline (its leading spaces are kept now).
    assert m["documents_normalized"] == 1 and "  normalized                     1 changed" in lines
    assert m["dropped_first"]["bad_json"].endswith("good.jsonl:41")
    assert (m["exact_duplicates"], m["fuzzy_duplicates"], m["fuzzy_clusters"]) == (1, 1, 1), m
    assert m["pii_redacted"]["email"] == 1 and m["pii_redacted"]["phone"] == 1
    assert m["documents_out"] == m["documents_kept_after_filters"] - 2

    folder = result.path
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token is not None and tok.chat_template
    tokens_written = 0
    decoded = ""
    for split in ("train", "val"):
        shards = sorted(glob.glob(f"{folder}/packed/{split}/*.parquet"))
        assert shards, split
        for shard in shards:
            ids = np.array(pq.read_table(shard).column("input_ids").to_pylist())
            assert ids.shape[1] == 16 and ids.max() < len(tok) and ids.min() >= 0
            tokens_written += ids.size
            decoded += tok.decode(ids.ravel())
    # No token lost: everything tokenized is in a shard except the counted per-unit remainders.
    assert tokens_written + m["remainder_tokens_dropped"] == m["tokens_train"] + m["tokens_val"]
    # No document duplicated; the exact and the near duplicate of `base` survive once between them.
    for doc in texts["distinct"]:
        assert decoded.count(doc[:120]) == 1
    # base, its upper-case copy (exact) and its one-word edit (fuzzy): one survivor among the three
    assert decoded.lower().count(texts["base"][:200].lower()) == 1
    assert "<EMAIL>" in decoded and "keeper@harbor.example" not in decoded

    dropped = pq.read_table(glob.glob(f"{folder}/dropped/*.parquet")).to_pylist()
    bad = next(r for r in dropped if r["reason"] == "bad_json")
    assert bad["source"].endswith("good.jsonl:41")  # 38 docs, the near duplicate, the PII doc, then the broken line
    assert any(r["reason"] == "read_error" and r["source"].endswith("cut.jsonl.gz") for r in dropped)

    sft_rows = pq.read_table(glob.glob(f"{folder}/sft/*/*.parquet")).to_pylist()
    assert len(sft_rows) == 31 and m["sft"]["dropped_bad_json"] == 1
    assert glob.glob(f"{folder}/sft/val/*.parquet")
    nile = next(r for r in sft_rows if "Nile" in tok.decode(r["input_ids"]))
    # the answer up to its end-of-turn token, as fine-tuning renders and serving stops (not the newline after)
    assert tok.decode([x for x in nile["labels"] if x != -100]) == "The Nile.<|end|>"

    stats = json.loads(open(f"{folder}/stats.json").read())
    assert stats["exact_duplicates"] == 1 and stats["seq_len"] == 16
    assert stats["read_errors"] == unreadable and stats["dropped"]["read_error"] == 1

    # The tasks that wrote the files checksummed them: one sidecar per task, each entry the file's real hash.
    from pathlib import Path

    from llm.manifest import file_sha256, read_manifest

    sides = sorted(Path(folder, "_CHECKSUMS").glob("*.json"))
    names = {p.stem for p in sides}
    assert {"tokenizer", "pack-00000", "sft-00000"} <= names and any(n.startswith("clean-") for n in names)
    recorded = {rel: meta for p in sides for rel, meta in json.loads(p.read_text()).items()}
    for rel, meta in recorded.items():
        assert meta == {"size": Path(folder, rel).stat().st_size, "sha256": file_sha256(Path(folder, rel))}, rel
    written = {p.relative_to(folder).as_posix() for d in ("packed", "sft", "tokenizer", "dropped")
               for p in Path(folder, d).rglob("*") if p.is_file()}
    assert written <= set(recorded)
    manifest = read_manifest(folder)
    assert manifest is not None and all(manifest.files[rel] == recorded[rel] for rel in written)

    again = run(cfg)
    assert again.skipped
    changed = run(tiny_config(tmp_path, *overrides, "data.seq_len=24").llm)
    assert not changed.skipped and changed.metrics["seq_len"] == 24


def test_corpus_with_nothing_to_train_on_is_one_line_error_and_no_commit(ray_session, tmp_path):
    """An empty corpus committed a data stage that pretrain cannot use, and the rerun was then skipped."""
    from llm.errors import DataError
    from llm.manifest import read_manifest

    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("tiny")
    (root / "b.jsonl").write_text('{"text": "also tiny"}\n{"text": oops}\n{"text": "short"}\n')
    cfg = tiny_config(tmp_path, f"data.sources=[{root}/*]", "data.min_chars=50", "data.sft.sources=[]").llm
    with pytest.raises(DataError, match=r"^data: no document passed reading and the filters \(4 documents read: "
                                        r"too_short 3, bad_json 1\); check data.sources, .*; nothing committed$"):
        run(cfg)
    assert read_manifest(cfg.stage_dir("data")) is None
    # Documents kept, but fewer tokens than one training sequence: pretrain would have no batch either.
    (root / "c.txt").write_text(prose(random.Random(1), 60))
    short = tiny_config(tmp_path, f"data.sources=[{root}/*]", "data.min_chars=50", "data.sft.sources=[]",
                        "data.seq_len=4096", "data.tokenizer.vocab_size=300", "pretrain.model.context=4096").llm
    with pytest.raises(DataError, match=r"^data: the corpus packs into no training sequence \(\d+ training tokens, "
                                        r"data.seq_len=4096; 5 documents read: too_short 3, bad_json 1, kept 1\); "
                                        r"nothing committed$"):
        run(short)
    assert read_manifest(short.stage_dir("data")) is None
