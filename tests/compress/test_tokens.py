"""Compress without a data stage: a brought base and chat data are enough. The tokens come from the data stage
only when it tokenized with the original's tokenizer, else from the fine-tuning data as finetune rendered it,
else from the chat records rendered here; the whole stage then runs on them (no Ray: distillation in the
driver with `compress.sizing.workers=0`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from llm.compress import tokens as token_source
from llm.errors import StageInputError
from llm.manifest import write_manifest
from llm.stage import config_hash
from tests.conftest import tiny_config
from tests.models import conftest as zoo_fixtures
from tests.train.test_finetune_helpers import sft_records, write_jsonl

zoo = zoo_fixtures.zoo
FAST = ("compress.eval.prompts=4", "compress.eval.max_new_tokens=8", "compress.eval.speed_tokens=4",
        "compress.eval.sft_rows=16", "compress.prune.calib_rows=4", "data.seq_len=64", "data.sft.max_len=96",
        "data.sft.val_fraction=0.1")


def _config(tmp_path: Path, *overrides: str) -> Any:
    chat = write_jsonl(tmp_path / "chat.jsonl", sft_records(80))
    return tiny_config(tmp_path, "compress.enabled=true", f"finetune.data=[{chat}]", *FAST, *overrides).llm


def _committed_finetune(cfg: Any, base: Path) -> Path:
    """A committed finetune folder: the base as its model/, and sft/ rendered with the base's tokenizer."""
    from llm.train.sft import prepare_tokenizer, render_sources

    folder = Path(cfg.stage_dir("finetune"))
    shutil.copytree(base, folder / "model")
    tok = prepare_tokenizer(base, folder / "tokenizer")
    render_sources(tok, cfg.finetune.data, folder / "sft", 96, 0.1, "metadata.llm.finetune.data")
    write_manifest(folder, "finetune", config_hash(cfg, "finetune"), {}, {})
    return folder


def _committed_data_stage(cfg: Any) -> Path:
    """A committed data stage in the project's own tokenizer (another vocabulary than any zoo family's)."""
    from tests.train.test_finetune_helpers import our_tokenizer

    folder = Path(cfg.stage_dir("data"))
    our_tokenizer(folder / "tokenizer")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "packed" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": pa.array([[1] * 64] * 4, pa.list_(pa.int32()))}),
                   folder / "packed" / "train" / "part-00000.parquet")
    write_manifest(folder, "data", config_hash(cfg, "data"), {}, {})
    return folder


def test_the_finetune_stages_rendered_data_is_used_without_a_data_stage(zoo, tmp_path):
    cfg = _config(tmp_path)
    tuned = _committed_finetune(cfg, zoo("qwen2"))
    planned = token_source.plan(cfg, tuned / "model", "finetune")
    assert planned.sft_from == "finetune" and planned.stages == ("finetune",) and planned.packed is None
    calib = token_source.calibration_rows(planned, 4, cfg.data.seq_len, tuned / "model")
    assert calib.shape == (4, 64) and calib.max() < 576  # Qwen2's ids, not the project tokenizer's


def test_a_data_stage_in_another_tokenizer_is_not_used(zoo, tmp_path):
    """The data stage's packed ids would mean other tokens to a Qwen2 base: the chat records are rendered
    with Qwen2's tokenizer instead (before, compress calibrated and evaluated on the foreign ids)."""
    cfg = _config(tmp_path, f"compress.base={zoo('qwen2')}")
    data = _committed_data_stage(cfg)
    planned = token_source.plan(cfg, zoo("qwen2"), None)
    assert planned.sft_from == "rendered" and planned.packed is None and planned.stages == ()
    # The same vocabulary with another chat template: the packed text is used, the chat rows are rendered.
    from transformers import AutoTokenizer

    ours = tmp_path / "ours"
    shutil.copytree(zoo("llama"), ours)
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    tok.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    tok.save_pretrained(str(ours))
    planned = token_source.plan(cfg, ours, None)
    assert planned.packed is not None and planned.sft_from == "rendered" and planned.stages == ("data",)
    folder, sft = token_source.distill_rows(cfg, planned, from_finetune=False)
    assert folder is planned.packed and not sft


def test_without_distillation_only_the_rows_compress_reads_are_rendered(zoo, tmp_path):
    from llm import storage

    cfg = _config(tmp_path, f"compress.base={zoo('qwen2')}", "compress.variants=[int8]")
    planned = token_source.plan(cfg, zoo("qwen2"), None)
    work = storage.Folder(tmp_path / "work")
    made = token_source.render(cfg, planned, work, zoo("qwen2"), from_finetune=False)
    stats = json.loads((tmp_path / "work" / "sft" / "stats.json").read_text())["counts"]
    # 4 calibration rows x 64 tokens need a few train records; the held-out ones are all rendered (16 at most).
    assert 0 < stats["train"] < 20 and stats["not_rendered"] == 80 - stats["train"] - stats["val"]
    calib = token_source.calibration_rows(made, 4, 64, zoo("qwen2"))
    assert calib.shape == (4, 64)


def test_no_tokens_anywhere_is_one_line(zoo, tmp_path):
    cfg = tiny_config(tmp_path, "compress.enabled=true", f"compress.base={zoo('qwen2')}", "data.sft.sources=[]").llm
    with pytest.raises(StageInputError, match=r"no tokens in the tokenizer of .*qwen2.*set metadata\.llm\.finetune"
                                              r"\.data") as e:
        token_source.plan(cfg, zoo("qwen2"), None)
    assert "\n" not in str(e.value)


def test_compress_runs_on_a_brought_base_and_chat_data(zoo, tmp_path):
    """A Llama-3-style base and chat records, nothing else: int8, pruned and a pruned student distilled on the
    SFT rows, an eval table with SFT perplexity and ROUGE-L but no packed-text perplexity, a choice."""
    from llm.compress.stage import run
    from llm.manifest import read_manifest

    cfg = _config(tmp_path, f"compress.base={zoo('llama')}", "compress.variants=[int8, pruned-distilled]",
                  "compress.sizing.workers=0", "compress.distill.max_steps=2", "compress.distill.micro_batch_size=2",
                  "compress.distill.lr.warmup_steps=1", "compress.distill.checkpoint_every=2",
                  "compress.distill.eval_every=2", "compress.distill.eval_batches=1", "compress.eval.serve_batch=2",
                  "compress.choose.max_ppl_increase=1000", "compress.choose.max_rouge_drop=1",
                  "compress.choose.min_speed_ratio=0")
    result = run(cfg)
    folder = Path(result.path)
    assert (folder / "_work" / "sft" / "train").is_dir()
    rows = {r["model"]: r for r in json.loads((folder / "eval.json").read_text())["rows"]}
    assert list(rows) == ["original", "int8", "pruned-distilled"]
    for r in rows.values():
        assert r["val_ppl"] is None and r["sft_ppl"] and r["prompts"] == 4 and r["tok_s_serve"]
    assert rows["pruned-distilled"]["params"] < rows["original"]["params"]
    chosen = json.loads((folder / "chosen.json").read_text())
    assert chosen["serve_batch"] == 2 and "tok_s_serve" in chosen["reason"]
    manifest = read_manifest(folder)
    assert manifest is not None and manifest.inputs == {}  # no earlier stage was read
