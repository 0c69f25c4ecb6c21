"""Checkpoints: DeepSpeed's own `save_checkpoint` plus the loop's position and each rank's RNG.

Layout of one checkpoint folder (every rank writes its part; Ray Train merges the ranks' folders):
    ds/            DeepSpeed tag folder: model, optimizer (ZeRO partitions per rank)
    latest         DeepSpeed's pointer to the tag
    zero_to_fp32.py  DeepSpeed's consolidation script (rank 0 copies it in)
    loop_state.json  step, epoch, data position, tokens seen (rank 0)
    rng_rank<r>.pt   torch CPU/CUDA generator states of rank r
    rng_rank<r>.json python `random` state of rank r
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TAG = "ds"


def save(engine: Any, folder: str | Path, state: dict[str, Any], rank: int) -> None:
    """Write this rank's part of a checkpoint into `folder` (every rank calls this: ZeRO saves collectively)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder), tag=TAG, client_state={"loop_state": state})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    (folder / f"rng_rank{rank}.json").write_text(json.dumps(random.getstate()))
    if rank == 0:
        (folder / "loop_state.json").write_text(json.dumps(state))


def load(engine: Any, folder: str | Path, rank: int) -> dict[str, Any]:
    """Restore model, optimizer, loop position and this rank's RNG from `folder`; returns the loop state."""
    import torch

    folder = Path(folder)
    path, client = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint to load")
    state = json.loads((folder / "loop_state.json").read_text())
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.exists():  # a different world size restores the model but not per-rank RNG streams
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        version, internal, gauss = json.loads((folder / f"rng_rank{rank}.json").read_text())
        random.setstate((version, tuple(internal), gauss))
    return state


def consolidate_fp32(folder: str | Path) -> dict[str, Any]:
    """Full fp32 weights from a checkpoint folder with DeepSpeed's own `zero_to_fp32` (any ZeRO stage >= 1)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG))
