"""The compress stage end to end on the session Ray: int8, pruned and pruned+distilled (2 DeepSpeed workers)
from a committed pretrain model, one eval table, chosen.json, each variant loading and generating; a rerun
skips. Tracked in the session's MLflow server: the chosen variant is the stage run's MLflow model, logged once,
and `mlflow.pyfunc.load_model` answers as the eval decodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llm.eval import ROW_KEYS
from llm.manifest import write_manifest
from llm.models.load import chosen_model_dir, load_model
from llm.stage import config_hash
from tests.train.conftest import build_data_stage, train_config

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]


def _pretrained(cfg: Any, data: Path) -> Path:
    """A committed pretrain folder holding a tiny random Llama with the data stage's tokenizer (+ chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm.models.chat import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    folder = Path(cfg.stage_dir("pretrain"))
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    write_manifest(folder, "pretrain", config_hash(cfg, "pretrain"), {}, {})
    return folder / "model"


def test_compress_stage_builds_evaluates_chooses_and_skips(tmp_path: Path, ray_session: Any,
                                                           mlflow_server: str) -> None:
    from llm import tracking
    from llm.compress.stage import STAGE, run

    loaded = train_config(
        tmp_path, "compress.enabled=true", "compress.distill.max_steps=4", "compress.distill.micro_batch_size=4",
        "compress.distill.lr.warmup_steps=1", "compress.distill.checkpoint_every=4", "compress.distill.eval_every=4",
        "compress.distill.eval_batches=1", "compress.distill.max_failures=0", "compress.distill.log_every=1",
        "compress.sizing.workers=2", "compress.sizing.cpus_per_worker=1", "compress.eval.val_rows=16",
        "compress.eval.prompts=4", "compress.eval.max_new_tokens=8", "compress.eval.speed_tokens=8",
        "compress.prune.calib_rows=8", "compress.choose.max_ppl_increase=1000", "compress.choose.max_rouge_drop=1",
        "compress.choose.min_speed_ratio=0", "compress.eval.serve_batch=4", "compress.eval.lm_eval.limit=8",
        "compress.eval.lm_eval.tasks=[llmray_ppl, llmray_cloze]",
        "compress.choose.min_task_scores={llmray_cloze/acc: 0}", f"tracking.mlflow.uri={mlflow_server}",
        "tracking.mlflow.experiment=t-compress")
    cfg = loaded.llm
    data = build_data_stage(loaded)
    base = _pretrained(cfg, data)
    result = tracking.tracked(cfg, STAGE, lambda: run(cfg))
    folder = Path(result.path)
    assert not result.skipped
    rows = json.loads((folder / "eval.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["original", "int8", "pruned", "pruned-distilled"]
    tasks = ("llmray_cloze/acc", "llmray_cloze/acc_norm", "llmray_ppl/bits_per_byte", "llmray_ppl/byte_perplexity",
             "llmray_ppl/word_perplexity")
    assert all(tuple(r) == ROW_KEYS + tasks for r in rows)  # lm-eval's columns after ours, for every model
    assert all(r["llmray_ppl/byte_perplexity"] > 1 and 0 <= r["llmray_cloze/acc"] <= 1 for r in rows)
    assert (folder / "lm_eval" / "llmray_cloze.yaml").is_file()  # the tasks run again with the lm_eval CLI
    by = {r["model"]: r for r in rows}
    assert by["int8"]["disk_mb"] < by["original"]["disk_mb"] and by["pruned"]["params"] < by["original"]["params"]
    assert by["pruned-distilled"]["params"] == by["pruned"]["params"]
    assert all(r["val_ppl"] and r["prompts"] == 4 and r["tok_s_b8"] and r["tok_s_serve"] for r in rows)
    # Distillation ran on Ray Train with both workers, and training moved the pruned weights.
    work = folder / "_work" / "pruned-distilled-train"
    assert sorted(p.name for p in (work / "ranks").iterdir()) == ["rank0.json", "rank1.json"]
    steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["loss"] > 0 for s in steps)
    assert by["pruned-distilled"]["val_ppl"] != by["pruned"]["val_ppl"]
    chosen = json.loads((folder / "chosen.json").read_text())
    assert chosen["variant"] == "int8" and "disk" in chosen["reason"]  # loose limits: smallest file wins
    assert "llmray_cloze/acc >= 0" in chosen["reason"]
    assert Path(chosen_model_dir(cfg)) == folder / "int8"
    for name in ("int8", "pruned", "pruned-distilled"):
        loaded_model = load_model(folder / name)
        ids = torch.tensor([[loaded_model.tokenizer.eos_token_id, 5, 6, 7]])
        assert loaded_model.model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3,
                                           do_sample=False).shape == (1, 7)
    assert load_model(base).format == "hf"
    again = tracking.tracked(cfg, STAGE, lambda: run(cfg))
    assert again.skipped and again.metrics["chosen"] == "int8"
    _check_logged_model(mlflow_server, folder / "int8")


def _check_logged_model(uri: str, chosen: Path) -> None:
    """The compress run's MLflow model is the chosen int8 variant, logged once (the skipped rerun continued the
    run), and its pyfunc answers prompts with the eval's decoding of that variant."""
    import mlflow

    from llm.eval import PromptPair, generate_texts

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("t-compress").experiment_id
    [stage] = client.search_runs([experiment], "tags.`llmray.stage` = 'compress'")
    assert stage.data.tags["llmray.model"] == str(chosen)
    logged = client.search_logged_models([experiment], filter_string=f"source_run_id = '{stage.info.run_id}'")
    assert len(logged) == 1 and logged[0].name == "model"
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{stage.info.run_id}/model", model_config={"max_new_tokens": 6})
    prompts = ["What is a tuple?", "Name a loop."]
    answers = pyfunc.predict(prompts)
    variant = load_model(chosen)
    pairs = [PromptPair([{"role": "user", "content": p}], "") for p in prompts]
    assert answers == generate_texts(variant.model, variant.tokenizer, pairs, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers) and any(answers)
