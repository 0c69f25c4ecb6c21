"""Unit tests without Ray: LR schedules, the DeepSpeed config, model building, FLOPs."""

from __future__ import annotations

import math

import pytest

from llm.config import ModelConfig, ScheduleConfig, TrainConfig
from llm.errors import ConfigError
from llm.plan import flops_per_token as plan_flops
from llm.train import ds_config
from llm.train.model import build_model, flops_per_token
from llm.train.schedules import lr_at


def test_cosine_warmup_peak_and_floor():
    s = ScheduleConfig(kind="cosine", peak=1e-3, warmup_steps=10, floor=0.1)
    assert lr_at(0, 100, s) == pytest.approx(1e-4)
    assert lr_at(9, 100, s) == pytest.approx(1e-3)
    assert lr_at(10, 100, s) == pytest.approx(1e-3)
    assert lr_at(55, 100, s) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the decay
    assert lr_at(100, 100, s) == pytest.approx(1e-4)


def test_linear_constant_inverse_sqrt():
    lin = ScheduleConfig(kind="linear", peak=1.0, warmup_steps=0, floor=0.0)
    assert [lr_at(i, 4, lin) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = ScheduleConfig(kind="constant", peak=2.0, warmup_steps=2)
    assert [lr_at(i, 10, const) for i in (0, 1, 2, 9)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    inv = ScheduleConfig(kind="inverse_sqrt", peak=1.0, warmup_steps=4, floor=0.0)
    assert lr_at(3, 100, inv) == pytest.approx(1.0)
    assert lr_at(15, 100, inv) == pytest.approx(math.sqrt(4 / 16))


def test_wsd_holds_then_decays_over_last_fraction():
    s = ScheduleConfig(kind="wsd", peak=1.0, warmup_steps=2, floor=0.1, decay_fraction=0.2)
    lrs = [lr_at(i, 100, s) for i in range(101)]
    assert lrs[2:80] == pytest.approx([1.0] * 78)
    assert lrs[90] == pytest.approx(1.0 - 0.9 * 0.5)
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:], strict=False))


def test_generated_deepspeed_config():
    cfg = ds_config.build(TrainConfig(zero_stage=3, micro_batch_size=2, grad_accum=4, precision="fp16",
                                      grad_clip=0.5, offload_optimizer=True, offload_params=True), world_size=2)
    assert cfg["train_batch_size"] == 16
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert "bf16" not in cfg
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_override_merges_last():
    train = TrainConfig(deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 7})
    cfg = ds_config.build(train, world_size=1)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                        "reduce_bucket_size": 1000}
    assert cfg["steps_per_print"] == 7


@pytest.mark.parametrize(("override", "key"), [
    ({"zero_optimization": {"stage": 5}}, "metadata.llm.pretrain.deepspeed.zero_optimization.stage"),
    ({"zero_optimization": {"no_such_knob": 1}}, "metadata.llm.pretrain.deepspeed.zero_optimization.no_such_knob"),
    ({"bogus_key": 1}, "metadata.llm.pretrain.deepspeed.bogus_key"),
    ({"optimizer": {"type": "Adam"}}, "metadata.llm.pretrain.deepspeed.optimizer"),
    ({"train_batch_size": 3}, "metadata.llm.pretrain.deepspeed.train_batch_size"),
    ({"fp16": {"enabled": True}}, "metadata.llm.pretrain.deepspeed.fp16"),
    ({"gradient_clipping": "big"}, "metadata.llm.pretrain.deepspeed.gradient_clipping"),
])
def test_bad_override_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        ds_config.build(TrainConfig(deepspeed=override), world_size=2)
    assert str(err.value).startswith(key + ":")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_build_model_and_flops_match_the_plan(arch):
    m = ModelConfig(arch=arch, n_layers=2, d_model=64, n_heads=4, context=32)
    a, b = build_model(m, 384, seed=3), build_model(m, 384, seed=3)
    assert a.config.vocab_size == 384 and a.config.num_hidden_layers == 2
    assert all((p - q).abs().max() == 0 for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert flops_per_token(a, 32) == plan_flops(m, 384, 32)


def test_no_val_shards_means_no_evaluation_not_a_crash() -> None:
    """A data stage with `val_fraction: 0` has no val shards: evaluation returns nothing instead of failing
    (the engine is never touched, so none is needed here)."""
    from llm.config import ModelConfig, TrainConfig
    from llm.train.evaluate import evaluate
    from llm.train.runtime import LocalRuntime
    from llm.train.spec import LoopSpec

    spec = LoopSpec(train=TrainConfig(eval_batches=2), model=ModelConfig(), vocab_size=8, seq_len=4, val_files=[])
    assert evaluate(None, LocalRuntime(device="cpu"), spec, micro=4, cache=[]) is None


def test_metrics_log_eta_ignores_startup_and_resume_trims(tmp_path, capsys) -> None:
    """The first step of a process carries start-up time; the ETA must not inherit it. On resume the
    records after the restored step are dropped, so metrics.jsonl reads as one run."""
    import json

    from llm.train.metrics import MetricsLog

    rec = {"loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3, "mfu": 0.1}
    log = MetricsLog(tmp_path, max_steps=10, log_every=1)
    for step, dt in ((1, 40.0), (2, 1.0), (3, 1.0), (4, 1.0)):
        log.log({"step": step, "step_time_s": dt, **rec})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("[pretrain] step 1/10")
    assert lines[0].endswith("ETA 6m00s") and lines[3].endswith("ETA 0m06s")
    resumed = MetricsLog(tmp_path, max_steps=10, log_every=1, resumed_step=2)
    resumed.log({"step": 3, "step_time_s": 30.0, **rec})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
