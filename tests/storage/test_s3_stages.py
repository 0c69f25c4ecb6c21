"""Every stage with `storage` in an S3 bucket (moto's server, a real HTTP S3 API): data, pretrain (interrupted,
resumed from the checkpoints in the bucket), a one-trial sweep (Tune's experiment and each trial's folder in the
bucket), finetune (LoRA), compress (int8), and the chosen model copied from
the bucket into the cache and answering a prompt as a Serve replica does; each committed in the bucket and
skipped on a rerun.

Runs in a subprocess with its own Ray: Ray's workers take the AWS variables from the environment Ray
started in, and the session's shared Ray was started without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm import storage
from llm.manifest import read_manifest
from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray

    from llm.loading import load_config
    from llm.data.stage import run as run_data
    from llm.errors import TrainingError
    from llm.train.pretrain import run as run_pretrain
    from tests.conftest import LOCAL_YAML

    prefix = sys.argv[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    loaded = load_config(LOCAL_YAML, [
        f"storage={prefix}", "data.seq_len=32", "data.tokenizer.vocab_size=384", "pretrain.model.context=32",
        "data.sft.sources=[]", "data.dedup.fuzzy.enabled=false",
        "pretrain.max_steps=4", "pretrain.micro_batch_size=4", "pretrain.checkpoint_every=2",
        "pretrain.eval_every=4", "pretrain.eval_batches=1", "pretrain.log_every=1", "pretrain.max_failures=0",
        # finetune renders its own examples (uploaded before the workers start); one worker, two steps
        "finetune.data=[builtin:python-sft]", "finetune.max_len=64", "finetune.max_steps=2",
        "finetune.micro_batch_size=4", "finetune.checkpoint_every=2", "finetune.eval_every=2",
        "finetune.eval_batches=1", "finetune.log_every=1", "finetune.max_failures=0", "finetune.sizing.workers=1",
        "finetune.eval.prompts=2", "finetune.eval.max_new_tokens=4", "finetune.eval.sft_rows=8",
        "compress.variants=[int8]", "compress.eval.val_rows=8", "compress.eval.prompts=0",
        "compress.eval.speed_tokens=4", "compress.prune.calib_rows=4", "compress.choose.max_ppl_increase=1000",
        "compress.choose.max_rouge_drop=1", "compress.eval.lm_eval.tasks=[]",
        # one one-worker trial of two steps, no scheduler
        "sweep.enabled=true", "sweep.num_trials=1", "sweep.max_steps=2", "sweep.eval_every=2",
        "sweep.eval_batches=1", "sweep.grace_period=2", "sweep.scheduler=none", "sweep.sizing.workers=1",
        "sweep.sizing.cpus_per_worker=1", "sweep.max_concurrent_trials=2"])
    cfg = loaded.llm
    out = {"data": run_data(cfg).skipped, "data_again": run_data(cfg).skipped}
    try:
        run_pretrain(cfg, kill_at_step=3)  # a checkpoint at step 2 lands in the bucket, then a worker is SIGKILLed
        out["interrupted"] = False
    except TrainingError as e:
        out["interrupted"] = "\\n" not in str(e)
    from llm.manifest import read_manifest
    from llm.train import checkpoint as ckpt
    out["manifest_after_interruption"] = read_manifest(cfg.stage_dir("pretrain")) is not None
    out["checkpoint_steps"] = [ckpt.step_of(c) for c in ckpt.candidates(cfg.stage_dir("pretrain") + "/ray")]
    resumed = run_pretrain(cfg)
    out.update(resumed=resumed.skipped, path=resumed.path, again=run_pretrain(cfg).skipped)

    from llm.tune.stage import run as run_sweep
    swept = run_sweep(cfg)
    out.update(sweep=swept.skipped, sweep_metrics=swept.metrics, sweep_again=run_sweep(cfg).skipped)

    from llm.compress.stage import run as run_compress
    from llm.train.finetune import run as run_finetune
    tuned = run_finetune(cfg)
    out.update(finetune=tuned.skipped, finetune_metrics=tuned.metrics, finetune_again=run_finetune(cfg).skipped)
    packed = run_compress(cfg)
    out.update(compress=packed.skipped, chosen=packed.metrics["chosen"], compress_again=run_compress(cfg).skipped)

    # What a Serve replica does (llm.serve.app.LLMServer): the chosen model from the bucket, via the cache.
    import torch
    from llm.models.load import load_model, local_model
    from llm.serve.app import model_dirs
    served = next(iter(model_dirs(cfg).values()))
    model = load_model(local_model(served))
    ids = torch.tensor([[model.tokenizer.eos_token_id, 5, 6]])
    out.update(served=served, local=str(model.path), format=model.format,
               generated=model.model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2,
                                              do_sample=False).shape[1])
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
""")


def test_data_and_pretrain_in_a_bucket(s3_prefix: str, tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "LLMRAY_CACHE": str(tmp_path / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, s3_prefix], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["data"] is False and out["data_again"] is True
    assert out["interrupted"] and not out["manifest_after_interruption"] and out["checkpoint_steps"] == [2]
    assert out["resumed"] is False and out["again"] is True
    assert "pretrain: resuming from step 2" in proc.stdout

    data, pre = f"{s3_prefix}/local-tiny/data", f"{s3_prefix}/local-tiny/pretrain"
    assert out["path"] == pre
    manifest = read_manifest(data, verify=True)
    assert manifest is not None and any(f.startswith("packed/train/") for f in manifest.files)
    assert "tokenizer/tokenizer.json" in manifest.files and not any(f.startswith("_work/") for f in manifest.files)
    manifest = read_manifest(pre, verify=True)
    assert manifest is not None and "model/model.safetensors" in manifest.files
    ranks = [json.loads(storage.read_text(f"{pre}/ranks/rank{r}.json")) for r in (0, 1)]
    assert [r["resumed_at"] for r in ranks] == [2, 2] and all(r["step"] == 4 for r in ranks)
    records = [json.loads(x) for x in storage.read_text(f"{pre}/metrics.jsonl").splitlines() if x.strip()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    sweep = f"{s3_prefix}/local-tiny/sweep"
    assert out["sweep"] is False and out["sweep_again"] is True and out["sweep_metrics"]["trials"] == 1
    manifest = read_manifest(sweep, verify=True)
    assert manifest is not None and {"trials.csv", "best.json", "curves.png", "tune/tuner.pkl"} <= set(manifest.files)
    trials = sorted({f.split("/")[1] for f in manifest.files if f.startswith("trials/")})
    assert len(trials) == 1 and json.loads(storage.read_text(f"{sweep}/best.json"))["trial_id"] in trials
    for trial in trials:
        assert {f"trials/{trial}/{name}" for name in ("trial.json", "metrics.jsonl", "ranks/rank0.json")} \
            <= set(manifest.files)
        assert any(f.startswith(f"trials/{trial}/train/") for f in manifest.files)  # its Ray Train run's checkpoint
        records = [json.loads(x) for x in storage.read_text(f"{sweep}/trials/{trial}/metrics.jsonl").splitlines()]
        assert [r["step"] for r in records if "val_loss" in r] == [2]
    ft, comp = f"{s3_prefix}/local-tiny/finetune", f"{s3_prefix}/local-tiny/compress"
    assert out["finetune"] is False and out["finetune_again"] is True
    assert out["finetune_metrics"]["method"] == "lora" and out["finetune_metrics"]["steps"] == 2
    assert out["finetune_metrics"]["data"]["rendered"] is True and out["finetune_metrics"]["base"] == f"{pre}/model"
    manifest = read_manifest(ft, verify=True)
    assert manifest is not None
    for name in ("adapter/adapter_model.safetensors", "model/config.json", "tokenizer/tokenizer.json",
                 "metrics.jsonl", "eval.json", "ranks/rank0.json"):
        assert name in manifest.files, name
    assert any(f.startswith("sft/train/") for f in manifest.files) and any(f.startswith("ray/") for f in manifest.files)
    assert out["compress"] is False and out["compress_again"] is True
    manifest = read_manifest(comp, verify=True)
    assert manifest is not None and {"int8/quantization.json", "int8/.done", "chosen.json"} <= set(manifest.files)
    assert [r["model"] for r in json.loads(storage.read_text(f"{comp}/eval.json"))["rows"]] == ["original", "int8"]
    chosen = json.loads(storage.read_text(f"{comp}/chosen.json"))
    want = f"{comp}/{chosen['variant']}" if chosen["variant"] != "original" else f"{ft}/model"
    assert out["served"] == want and out["local"].startswith(str(tmp_path / "cache" / "inputs"))
    assert out["generated"] == 5
    # Nothing of the stages' outputs stayed on local disk: the run folder lives in the bucket only.
    assert not (tmp_path / "s3:").exists() and not list((tmp_path / "cache" / "staging").glob("*/*"))
