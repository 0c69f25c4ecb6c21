"""The main job end to end: the real data stage feeds the real pretrain stage; a rerun skips both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.manifest import manifest_hash, read_manifest
from llm.stages import run_pipeline, stages_to_run
from tests.conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]


def _corpus(root: Path) -> Path:
    """A small real-text corpus: Python's own help topics, one jsonl record each."""
    from pydoc_data.topics import topics

    path = root / "topics.jsonl"
    path.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:60]))
    return path


def test_run_data_then_pretrain_then_skip(ray_session, tmp_path: Path) -> None:
    source = _corpus(tmp_path)
    base = (
        f"data.sources=[{source}]", "data.sft.sources=[]", "data.seq_len=32",
        "data.tokenizer.vocab_size=384", "pretrain.model.context=32", "pretrain.max_steps=4",
        "pretrain.micro_batch_size=2", "pretrain.checkpoint_every=2", "pretrain.eval_every=2",
        "pretrain.eval_batches=1", "pretrain.log_every=1", "pretrain.lr.warmup_steps=1",
        "pretrain.max_failures=0", "serve.enabled=false", "compress.enabled=false", "finetune.enabled=false",
    )
    cfg = tiny_config(tmp_path, *base).llm
    assert stages_to_run(cfg) == ["data", "pretrain"]

    first = run_pipeline(cfg)
    assert [r.stage for r in first] == ["data", "pretrain"]
    assert not any(r.skipped for r in first)
    data, pretrain = first
    # Pretrain read the data stage's committed output: its manifest names the data manifest as input.
    manifest = read_manifest(Path(pretrain.path))
    assert manifest is not None and manifest.inputs == {"data": manifest_hash(Path(data.path))}
    recs = [json.loads(x) for x in (Path(pretrain.path) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["tokens"] == 4 * 2 * 2 * 32
    assert (Path(pretrain.path) / "model" / "model.safetensors").exists()

    again = run_pipeline(cfg)
    assert [r.skipped for r in again] == [True, True]
    # A changed data config reruns data, and pretrain after it because its input changed (its own changed key
    # too); an output-changing rerun keeps the old folder aside.
    changed_keys = ("data.val_fraction=0.2", "pretrain.lr.peak=1e-3")
    changed = run_pipeline(tiny_config(tmp_path, *base, *changed_keys).llm)
    assert [r.skipped for r in changed] == [False, False]
    kept = changed[1].kept_aside
    assert kept and read_manifest(kept) is not None and (Path(kept) / "model" / "model.safetensors").exists()

    # Knobs that change no output skip a finished stage.
    assert [r.skipped for r in run_pipeline(tiny_config(tmp_path, *base, *changed_keys, "pretrain.log_every=5",
                                                         "pretrain.eval_every=1").llm)] == [True, True]
