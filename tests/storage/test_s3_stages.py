"""Data and pretrain with `storage` in an S3 bucket (moto's server, a real HTTP S3 API): committed in the
bucket, rerun skipped, an interrupted pretrain resumed from the checkpoints in the bucket.

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

    from llm.config import load_config
    from llm.data.stage import run as run_data
    from llm.errors import TrainingError
    from llm.train.stage import run as run_pretrain
    from tests.conftest import LOCAL_YAML

    prefix = sys.argv[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    loaded = load_config(LOCAL_YAML, [
        f"storage={prefix}", "data.seq_len=32", "data.tokenizer.vocab_size=384", "pretrain.model.context=32",
        "pretrain.max_steps=4", "pretrain.micro_batch_size=4", "pretrain.checkpoint_every=2",
        "pretrain.eval_every=4", "pretrain.eval_batches=1", "pretrain.log_every=1", "pretrain.max_failures=0"])
    cfg = loaded.llm
    out = {"data": run_data(cfg).skipped, "data_again": run_data(cfg).skipped}
    try:
        run_pretrain(cfg, fail_at_step=3)  # a checkpoint at step 2 lands in the bucket, then the run dies
        out["interrupted"] = False
    except TrainingError as e:
        out["interrupted"] = "simulated interruption" in str(e)
    from llm.manifest import read_manifest
    from llm.train import checkpoint as ckpt
    out["manifest_after_interruption"] = read_manifest(cfg.stage_dir("pretrain")) is not None
    out["checkpoint_steps"] = [ckpt.step_of(c) for c in ckpt.candidates(cfg.stage_dir("pretrain") + "/ray")]
    resumed = run_pretrain(cfg)
    out.update(resumed=resumed.skipped, path=resumed.path, again=run_pretrain(cfg).skipped)
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
    # Nothing of the stages' outputs stayed on local disk: the run folder lives in the bucket only.
    assert not (tmp_path / "s3:").exists() and not list((tmp_path / "cache" / "staging").glob("*/*"))
