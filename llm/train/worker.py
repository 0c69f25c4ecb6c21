"""Ray Train's entry point for every training stage: `TorchTrainer(train_loop_per_worker,
train_loop_config=spec.to_dict())`.

Inputs a library needs on disk (the tokenizer, a base model, a checkpoint to continue) are local copies
(`storage.fetch` / `checkpoint.reading`: the folders themselves on a shared disk; of a checkpoint, only this
rank's part). When the stage folder is in an object store (`LoopSpec.upload_to`), the loop writes its outputs
(metrics.jsonl, ranks/, model/) to a node-local folder per rank and the rank uploads what it wrote there, so
nothing depends on which node rank 0 ran on; checkpoints are written and downloaded beside it
(`rank<r>-checkpoints/`) and go to the store through Ray Train's `storage_path`.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from llm import storage
from llm.train import checkpoint as ckpt
from llm.train.loop import run_loop
from llm.train.runtime import RayRuntime
from llm.train.spec import LoopSpec


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the one loop on this node's copies of the spec's inputs."""
    spec, rt = LoopSpec.from_dict(config), RayRuntime()
    run_on_node(spec, rt)


def run_on_node(spec: LoopSpec, rt: RayRuntime) -> None:
    """The loop with every input on this node and, with `upload_to`, this rank's outputs uploaded after."""
    model = spec.model
    if model.path:
        model = model.model_copy(update={"path": str(storage.fetch(model.path))})
    spec = replace(spec, model=model,
                   tokenizer_dir=str(storage.fetch(spec.tokenizer_dir)) if spec.tokenizer_dir else None)
    if spec.upload_to and spec.out_dir:
        spec = replace(spec, out_dir=_rank_folder(spec, rt))
    with contextlib.ExitStack() as stack:  # every rank reads its part of the checkpoint from its own node
        for name in ("resume_from", "init_checkpoint"):
            uri = getattr(spec, name)
            if uri:
                copy = ckpt.reading(uri, rt.rank, rt.world_size, rt.scratch)
                local: dict[str, Any] = {name: str(stack.enter_context(copy))}
                spec = replace(spec, **local)
        run_loop(spec, rt)
    if spec.upload_to and spec.out_dir:
        storage.upload(spec.out_dir, spec.upload_to)


def _rank_folder(spec: LoopSpec, rt: RayRuntime) -> str:
    """`<out_dir>/rank<r>`, fresh (ranks sharing a node never upload each other's half-written files; a node
    reused by a restarted group keeps no stale ones); rank 0's starts from the stored records of a resumed
    run and publishes them as it goes."""
    assert spec.out_dir is not None and spec.upload_to is not None
    out = Path(spec.out_dir) / f"rank{rt.rank}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    records = storage.join(spec.upload_to, "metrics.jsonl")
    if rt.rank == 0 and storage.size(records) is not None:  # a resumed run appends to the stored records
        (out / "metrics.jsonl").write_bytes(storage.read_bytes(records))
    rt.publish = (str(out), spec.upload_to)
    rt.publish_each = spec.publish_each
    rt.scratch = out.with_name(f"rank{rt.rank}-checkpoints")  # beside it, never uploaded with it
    shutil.rmtree(rt.scratch, ignore_errors=True)
    return str(out)
