"""`llmray plan`: nodes, time, cost and memory per GPU from the cluster file, checked by hand arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm.hardware import DEFAULT_PRICES
from llm.loading import load_config
from llm.plan import build_plan, flops_per_token
from llm.plan_text import format_plan

from .conftest import LOCAL_YAML, ROOT

CONFIG_YAML = ROOT / "cluster" / "config.yaml"
# A ~7B llama: does not fit 8 x 80 GB at the shipped micro batch with ZeRO-2 in the single-GPU sweep trials.
BIG = ["pretrain.model.n_layers=32", "pretrain.model.d_model=4096", "pretrain.model.n_heads=32"]


def _row(plan: dict, stage: str) -> dict:
    return next(r for r in plan["training"] if r["stage"] == stage)


def _mem(plan: dict, stage: str) -> dict:
    return next(m for m in plan["memory"] if m["stage"] == stage)


def test_cloud_file_time_and_cost_by_hand() -> None:
    loaded = load_config(CONFIG_YAML)
    plan = build_plan(loaded)
    hw = plan["hardware"]
    assert (hw["node_type"], hw["instance"], hw["gpu"], hw["gpus_per_node"], hw["memory_gib"]) == (
        "gpu_worker", "p5.48xlarge", "H100", 8, 80)
    assert [r["stage"] for r in plan["training"]] == ["sweep", "pretrain", "finetune", "compress"]
    pre = _row(plan, "pretrain")
    # 10,000 steps x (16 micro x 4 accum x 16 GPUs) x 1024 tokens, at 989 TFLOP/s x 0.4 MFU on 16 GPUs
    tokens = 10_000 * 16 * 4 * 16 * 1024
    fpt = flops_per_token(loaded.llm.pretrain.model, 32768, 1024)
    hours = tokens * fpt / (16 * 989e12 * 0.4) / 3600
    assert pre["tokens"] == tokens and pre["gpu_nodes"] == 2
    assert pre["wall_hours"] == pytest.approx(hours)
    assert pre["gpu_hours"] == pytest.approx(2 * 8 * hours)  # nodes x GPUs per node x hours
    assert pre["cost_usd"] == pytest.approx(hours * (2 * 55.04 + 0.384))  # two GPU nodes and the head
    sweep = _row(plan, "sweep")  # 8 one-GPU trials at once: one node, one wave
    assert (sweep["runs"], sweep["gpu_nodes"]) == (8, 1)
    trial_hours = 60 * 16 * 4 * 1024 * fpt / (989e12 * 0.4) / 3600
    assert sweep["wall_hours"] == pytest.approx(trial_hours)
    assert sweep["gpu_hours"] == pytest.approx(8 * trial_hours)
    total = plan["total"]
    assert total["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in plan["training"]))
    assert total["wall_hours"] == pytest.approx(sum(r["wall_hours"] for r in plan["training"]))
    assert plan["prices"]["gpu_node_source"] == plan["prices"]["head_source"] == "estimate"
    assert plan["serve_usd_per_hour"] == pytest.approx([55.04 + 0.384] * 2)  # 1..4 replicas: one node
    text = format_plan(plan)
    assert "ESTIMATES" in text and "p5.48xlarge $55.04/h (estimate)" in text
    for m in plan["memory"]:
        assert m["fits"] is True, m


def test_configured_price_and_mfu_win() -> None:
    plan = build_plan(load_config(CONFIG_YAML, ["plan.prices.gpu_worker=10", "plan.prices.head=0", "plan.mfu=0.2"]))
    base = build_plan(load_config(CONFIG_YAML))
    pre, pre0 = _row(plan, "pretrain"), _row(base, "pretrain")
    assert pre["wall_hours"] == pytest.approx(2 * pre0["wall_hours"])  # half the MFU, twice the time
    assert pre["cost_usd"] == pytest.approx(pre["wall_hours"] * 2 * 10)
    assert plan["prices"]["gpu_node_source"] == "configured"
    assert "$10.00/h (configured)" in format_plan(plan)


def test_other_instance_type_from_tables(tmp_path: Path) -> None:
    """A g5.12xlarge worker: 4 A10G of 24 GiB, its own price; an instance without a price shows no cost."""
    doc = yaml.safe_load(CONFIG_YAML.read_text())
    worker = doc["available_node_types"]["gpu_worker"]
    worker["node_config"]["InstanceType"] = "g5.12xlarge"
    worker["resources"] = {"CPU": 48, "GPU": 4}
    doc["metadata"]["llm"]["pretrain"]["global_batch_size"] = 16 * 4 * 8
    path = tmp_path / "g5.yaml"
    path.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_config(path))
    assert (plan["hardware"]["gpu"], plan["hardware"]["memory_gib"], plan["hardware"]["peak_tflops"]) == (
        "A10G", 24, 70.0)
    pre = _row(plan, "pretrain")
    assert pre["gpu_nodes"] == 2 and pre["cost_usd"] == pytest.approx(
        pre["wall_hours"] * (2 * DEFAULT_PRICES["g5.12xlarge"] + DEFAULT_PRICES["m6i.2xlarge"]))
    worker["node_config"]["InstanceType"] = "g5.24xlarge"  # same GPUs, no built-in price
    path.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_config(path))
    assert _row(plan, "pretrain")["cost_usd"] is None and plan["total"]["cost_usd"] is None
    assert _row(plan, "pretrain")["wall_hours"] is not None
    assert " n/a" in format_plan(plan)


def test_local_file_has_no_gpus() -> None:
    plan = build_plan(load_config(LOCAL_YAML))
    assert plan["hardware"] is None and plan["training"] == [] and plan["estimate"] is None
    assert plan["total"]["cost_usd"] is None
    text = format_plan(plan)
    assert "no GPUs in the node types" in text and "wall time and cost n/a" in text
    assert [m["stage"] for m in plan["memory"]] == ["pretrain"] and plan["memory"][0]["fits"] is None


def test_oversize_model_warns_and_the_named_change_fits() -> None:
    plan = build_plan(load_config(CONFIG_YAML, BIG))
    warned = [m for m in plan["memory"] if m["fits"] is False]
    assert {m["stage"] for m in warned} >= {"sweep", "pretrain"}
    text = format_plan(plan)
    for m in warned:
        assert m["change"], m
        assert f"WARNING: {m['stage']}:" in text and " ".join(m["change"]) in text
        after = build_plan(load_config(CONFIG_YAML, [*BIG, *m["change"]]))
        assert _mem(after, m["stage"])["fits"] is True, (m["stage"], m["change"])
    # the pretrain change keeps the global batch: a smaller micro batch comes with a larger grad_accum
    pre = _mem(plan, "pretrain")["change"]
    if any("micro_batch_size" in c for c in pre):
        cfg = load_config(CONFIG_YAML, [*BIG, *pre]).llm.pretrain
        assert cfg.micro_batch_size * cfg.grad_accum == 16 * 4


def test_nothing_fits_says_so() -> None:
    huge = ["pretrain.model.n_layers=200", "pretrain.model.d_model=16384", "pretrain.model.n_heads=128",
            "plan.gpu_memory_gib=4"]
    plan = build_plan(load_config(CONFIG_YAML, huge))
    pre = _mem(plan, "pretrain")
    assert pre["fits"] is False and pre["change"] is None
    assert "a larger GPU or a smaller model" in format_plan(plan)


def test_cli_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "llm", "plan", "cluster/config.yaml"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:3] == ["stage", "runs", "GPU"] for line in lines)
    assert any(line.split()[:3] == ["pretrain", "1", "2"] for line in lines)  # one run on two GPU nodes
    assert "memory per GPU, pretrain" in out.stdout and "* ZeRO-2" in out.stdout
    assert len(lines) <= 50  # one screen
    assert "WARNING" not in out.stderr + out.stdout


def test_offload_needs_node_ram(tmp_path: Path) -> None:
    """Offloaded states must fit the node's RAM: with 64 GiB nodes the sweep trial's offload is ruled out."""
    roomy = _mem(build_plan(load_config(CONFIG_YAML, BIG)), "sweep")
    assert "pretrain.offload_optimizer=true" in roomy["change"]  # 2 TiB p5 nodes hold the offloaded states
    doc = yaml.safe_load(CONFIG_YAML.read_text())
    doc["available_node_types"]["gpu_worker"]["resources"]["memory"] = 64 * 2**30
    path = tmp_path / "small-ram.yaml"
    path.write_text(yaml.safe_dump(doc))
    tight = _mem(build_plan(load_config(path, BIG)), "sweep")
    assert tight["fits"] is False and tight["cpu_capacity_gib"] == pytest.approx(64 * 0.6)
    # a 7B model's ZeRO states on one 80 GB GPU need offload (fits nowhere else), and offload needs ~170 GB RAM
    assert tight["change"] is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_directory_shape_on_meta_device(arch: str, tmp_path: Path) -> None:
    """A local base directory is sized from its config.json on the meta device, the same as the built config."""
    from llm.config import ModelConfig
    from llm.plan import dir_shape, model_shape
    from llm.train.model import hf_config

    m = ModelConfig(arch=arch, n_layers=3, d_model=128, n_heads=4, n_kv_heads=2 if arch == "llama" else None,
                    context=256)
    hf_config(m, 1000).save_pretrained(tmp_path)  # config only: no weights are read
    for rank in (None, 8):
        assert dir_shape(str(tmp_path), rank) == model_shape(m, 1000, rank)
    assert dir_shape(str(tmp_path / "absent")) is None


def test_finetune_base_directory(tmp_path: Path) -> None:
    from llm.config import ModelConfig
    from llm.train.model import hf_config

    hf_config(ModelConfig(n_layers=4, d_model=256, n_heads=4, context=2048), 32768).save_pretrained(tmp_path)
    plan = build_plan(load_config(CONFIG_YAML, [f"finetune.base={tmp_path}"]))
    fin = _mem(plan, "finetune")
    assert fin["params"] != _mem(plan, "pretrain")["params"] and fin["fits"] is True
    assert _row(plan, "finetune")["wall_hours"] > 0
    absent = build_plan(load_config(CONFIG_YAML, [f"finetune.base={tmp_path / 'on-the-cluster'}"]))
    assert _row(absent, "finetune")["wall_hours"] is None and "finetune" not in {m["stage"] for m in absent["memory"]}
    assert "n/a" in format_plan(absent)
