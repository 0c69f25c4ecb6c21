"""Export: full weights gathered from any ZeRO stage, written by rank 0 as a Hugging Face directory.

Every rank must call `export_model` (ZeRO-3 gathers partitions collectively); only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, Any] | None:
    """fp32 copies of the full weights on rank 0 (None elsewhere), gathered from ZeRO-3 partitions if needed."""
    import contextlib

    import deepspeed
    import torch.distributed as dist

    module = engine.module
    params = list(module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3
              else contextlib.nullcontext())
    rank = dist.get_rank() if dist.is_initialized() else 0
    with gather:
        if rank != 0:
            return None
        return {k: v.detach().to("cpu").float().clone() for k, v in module.state_dict().items()}


def export_model(engine: Any, zero_stage: int, out_dir: str | Path, tokenizer: Any = None) -> Path | None:
    """Write `out_dir` (safetensors + config + tokenizer) on rank 0; returns the path there, None elsewhere."""
    import torch

    state = full_state_dict(engine, zero_stage)
    if state is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = engine.module
    # Saved in fp32: the module computed in bf16/fp16 under DeepSpeed, but a loader picks its own dtype.
    module.config.dtype = torch.float32
    module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
