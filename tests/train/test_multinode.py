"""Every training stage across nodes: a two-raylet Ray cluster on this machine, one worker per node
(STRICT_SPREAD) for pretraining, fine-tuning (LoRA) and a sweep trial.

Runs in a subprocess: this test session's own Ray (the `ray_session` fixture) is one node, and a process
holds one Ray connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from ray.cluster_utils import Cluster

    from llm.train.pretrain import run
    from tests.train.conftest import build_data_stage, train_config

    tmp = Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    base = [f"ray.address={cluster.address}", "pretrain.sizing.workers=2", "pretrain.sizing.cpus_per_worker=1",
            "pretrain.sizing.placement_strategy=STRICT_SPREAD", "pretrain.max_steps=4", "pretrain.checkpoint_every=2",
            "pretrain.eval_every=4"]
    loaded = train_config(tmp, *base)
    build_data_stage(loaded)
    result = run(loaded.llm)

    # Fine-tuning (LoRA) of that model and one sweep trial, each with one worker per node too.
    from llm.train.finetune import run as finetune
    from llm.tune.stage import run as sweep
    from tests.train.test_finetune_helpers import sft_records, write_jsonl

    write_jsonl(tmp / "sft.jsonl", sft_records(48))
    spread = "sizing={workers: 2, cpus_per_worker: 1, placement_strategy: STRICT_SPREAD}"
    more = ["finetune.enabled=true", f"finetune.data=[{tmp / 'sft.jsonl'}]", "finetune.method=lora",
            "finetune.max_steps=2", "finetune.micro_batch_size=2", "finetune.checkpoint_every=2",
            "finetune.eval_every=2", "finetune.eval_batches=1", "finetune.eval.enabled=false",
            "finetune.lr.warmup_steps=0", "finetune.max_failures=0", f"finetune.{spread}",
            "sweep.enabled=true", "sweep.num_trials=1", "sweep.max_steps=2", "sweep.eval_every=2",
            "sweep.eval_batches=1", "sweep.scheduler=none", "sweep.grace_period=2", f"sweep.{spread}"]
    cfg = train_config(tmp, *base, *more).llm
    tuned = finetune(cfg)
    swept = sweep(cfg)
    import ray
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps({"path": str(result.path), "nodes": nodes, "finetune": str(tuned.path),
                                  "sweep": str(swept.path)}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_two_nodes_one_worker_each(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert len(out["nodes"]) == 2
    folder = Path(out["path"])
    ranks = [json.loads(p.read_text()) for p in sorted((folder / "ranks").glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["step"] == 4 for r in ranks), ranks
    assert sorted(r["node"] for r in ranks) == out["nodes"], "the two ranks did not run on the two nodes"
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (folder / "model" / "model.safetensors").exists()

    tuned = Path(out["finetune"])
    trials = list((Path(out["sweep"]) / "trials").iterdir())
    assert len(trials) == 1
    for where in (tuned, trials[0]):  # fine-tuning and the sweep trial: one rank on each node
        ranks = [json.loads(p.read_text()) for p in sorted((where / "ranks").glob("rank*.json"))]
        assert sorted(r["node"] for r in ranks) == out["nodes"], (where, ranks)
        assert all(r["world_size"] == 2 and r["step"] == 2 for r in ranks), ranks
    assert (tuned / "adapter" / "adapter_model.safetensors").exists() and (tuned / "model").is_dir()
