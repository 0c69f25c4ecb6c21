"""Export: the fp32 master weights gathered from any ZeRO stage, written by rank 0 as a Hugging Face directory.

Under bf16/fp16 the module computes with a rounded copy of the weights; the optimizer holds the fp32
masters (partitioned under ZeRO). The export reads the masters through DeepSpeed's
`safe_get_full_fp32_param`, so it equals what `zero_to_fp32` consolidates from the last checkpoint, and
fine-tuning starts from the weights training actually reached. Every rank must call `export_model`: the
gathers are collective; only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.models.stops import write_generation_config


def full_state_dict(engine: Any) -> dict[str, Any] | None:
    """fp32 master copies of the full weights on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    by_param: dict[int, Any] = {}
    for _, param in module.named_parameters():  # the same order on every rank: the gathers line up
        if id(param) in by_param:
            continue
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        if master is None:  # no optimizer copy (fp32 training, frozen weights): the parameter is the master
            master = gathered(param)
        by_param[id(param)] = master.detach().to("cpu", dtype=_dtype(param)).clone() if rank == 0 else None
    if rank != 0:
        return None
    params = {name: p for name, p in module.named_parameters(remove_duplicate=False)}
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        p = params.get(name)
        out[name] = by_param[id(p)] if p is not None else tensor.detach().to("cpu").clone()
    return out


def _dtype(param: Any) -> Any:
    import torch

    return torch.float32 if param.is_floating_point() else param.dtype


def gathered(param: Any) -> Any:
    """The full value of a parameter that has no fp32 master (ZeRO-3 partitions gathered first)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param


def export_model(engine: Any, out_dir: str | Path, tokenizer: Any = None) -> Path | None:
    """Write `out_dir` (safetensors + config + tokenizer) on rank 0; returns the path there, None elsewhere.

    With a tokenizer, `generation_config.json` lists its chat template's end-of-turn token among the eos ids,
    so an engine that stops on eos ends a chat turn where the template does."""
    import torch

    state = full_state_dict(engine)
    if state is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = engine.module
    module.config.dtype = torch.float32  # the masters are fp32; a loader picks its own dtype
    module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        write_generation_config(out, module, tokenizer)
    return out
