"""Training sizes itself from the cluster file (what `llmray plan` prints), not from the nodes alive now,
and waits for the planned resources with a deadline instead of training on fewer workers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llm.errors import ClusterError
from llm.loading import load_config
from tests.conftest import ROOT
from tests.train.conftest import build_data_stage

CLOUD = ROOT / "cluster" / "config.yaml"


def cloud(tmp_path: Path, *overrides: str):
    # The bucket is not reachable here: storage and the corpus are local, the cluster is the file's.
    local = [f"storage={tmp_path / 'runs'}", "data.sources=[builtin:python-docs]"]
    local.append("data.sft.sources=[builtin:python-sft]")
    return load_config(CLOUD, [*local, "data.seq_len=32", *overrides])


def test_gpu_nodes_with_min_workers_0_give_one_gpu_worker_per_gpu(tmp_path: Path) -> None:
    from llm.config import ModelConfig, TrainConfig
    from llm.sizing import planned
    from llm.train.fit import build_trainer
    from llm.train.spec import LoopSpec

    loaded = cloud(tmp_path)
    gpu = loaded.cluster["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 8 and gpu["max_workers"] == 2
    sizing = planned(loaded.llm).pretrain  # the config alone, no cluster connected
    spec = LoopSpec(train=TrainConfig(), model=ModelConfig(), vocab_size=8, seq_len=32)
    trainer = build_trainer(spec, sizing.scaling_config_kwargs(), str(tmp_path / "ray"), 2, 0)
    scaling = trainer.scaling_config
    assert scaling.num_workers == 16 and scaling.use_gpu
    assert scaling.resources_per_worker["GPU"] == 1
    # The global batch of the file holds: 16 micro x 4 accum x 16 workers = 1024.
    pre = loaded.llm.pretrain
    assert pre.micro_batch_size * pre.grad_accum * scaling.num_workers == pre.global_batch_size == 1024


@pytest.mark.ray
def test_a_cluster_that_cannot_reach_the_plan_is_an_error_naming_the_shortfall(ray_session, tmp_path: Path) -> None:
    from llm.storage import Folder
    from llm.train.pretrain import fit

    loaded = cloud(tmp_path, "ray.resource_timeout_s=3")
    build_data_stage(loaded)
    folder = Path(loaded.llm.stage_dir("pretrain"))
    free_before = ray_session.available_resources().get("CPU", 0)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        fit(loaded.llm, Folder(folder))  # the session's Ray has 4 CPUs and no GPU, and no autoscaler
    assert time.monotonic() - t0 < 60
    message = str(err.value)
    assert "\n" not in message and "16 workers" in message and "'GPU': 1" in message
    assert "0 GPUs" in message and "ray.resource_timeout_s" in message
    assert not (folder / "ray").exists() or not any((folder / "ray").glob("attempt-*/checkpoint_*"))
    # Every resource is free again: the reservation was removed, nothing half-started holds CPUs.
    deadline = time.monotonic() + 10
    while ray_session.available_resources().get("CPU", 0) < free_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) == free_before
