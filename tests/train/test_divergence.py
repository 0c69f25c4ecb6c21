"""A step whose gradients are not finite stops bf16 training before that step's checkpoint, although
DeepSpeed's own overflow scan is off for bf16 with clipping (one process, no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llm.config import ModelConfig, ScheduleConfig, TrainConfig
from llm.errors import TrainingError
from llm.train import ds_config
from llm.train.data import write_rows
from llm.train.loop import LoopSpec, run_loop
from llm.train.runtime import LocalRuntime

pytestmark = pytest.mark.multiprocess  # DeepSpeed's gloo group in this process

BAD_STEP = 2


def nan_grads_at_step_2(spec: dict[str, Any]) -> Any:
    """Loss hook: the model's own loss, its gradient made NaN on the second step's micro batch only."""
    import torch

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return g * float("nan")

    calls = {"n": 0}

    def loss(engine: Any, out: Any, batch: Any) -> Any:
        calls["n"] += 1
        return NanGrad.apply(out.loss) if calls["n"] == BAD_STEP else out.loss

    return loss


def test_non_finite_gradients_stop_bf16_training_before_the_checkpoint(tmp_path: Path) -> None:
    train = TrainConfig(max_steps=4, micro_batch_size=4, zero_stage=2, precision="bf16", grad_clip=1.0,
                        checkpoint_every=BAD_STEP, eval_every=100, log_every=1, max_failures=0,
                        lr=ScheduleConfig(kind="constant", peak=1e-3, warmup_steps=0))
    assert ds_config.build(train, 1)["bf16"] == {"enabled": True, "check_grad_overflow": False}
    rows = np.random.default_rng(0).integers(0, 64, (64, 16)).astype(np.int32)
    model = ModelConfig(arch="llama", n_layers=1, d_model=32, n_heads=2, context=16)
    spec = LoopSpec(train=train, model=model, vocab_size=64,
                    seq_len=16, train_files=write_rows(rows, tmp_path / "shards", shards=1),
                    out_dir=str(tmp_path / "run"), export=False, peak_flops=1e12,
                    loss_hook=nan_grads_at_step_2)
    with pytest.raises(TrainingError, match=rf"^pretrain: step {BAD_STEP}: gradient norm is (nan|inf); lower "):
        run_loop(spec, LocalRuntime(checkpoint_root=str(tmp_path / "ckpt"), keep=2, device="cpu"))
    assert not list((tmp_path / "ckpt").rglob("checkpoint_*"))  # the diverged step was never saved
