"""The loop's validation loss: the first few held-out batches, read once and kept, the same at every
evaluation; every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""

from __future__ import annotations

from typing import Any

from llm.train.data import ShardIndex, collate_padded, parquet_batches, read_rows
from llm.train.runtime import Runtime
from llm.train.spec import LoopSpec


def sum_across_ranks(values: list[float], device: Any) -> list[float]:
    """Each value summed over the ranks (as they are with one rank)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def evaluate(engine: Any, rt: Runtime, spec: LoopSpec, micro: int, cache: list[Any]) -> float | None:
    """Mean validation loss over the first `spec.train.eval_batches` global batches of `micro` rows per rank.

    Those few batches are read once and kept in `cache`: the held-out set must be the same at every
    evaluation, and reading it again would cost time for nothing.
    """
    import torch

    if not spec.val_files:  # a data stage with `val_fraction: 0`: no evaluation, not a crash
        return None
    if spec.pad_id is not None:
        return _evaluate_padded(engine, rt, spec, micro, cache)
    if not cache:
        for i, batch in enumerate(parquet_batches(spec.val_files, micro * rt.world_size)):
            if i >= spec.train.eval_batches:
                break
            cache.append(batch[rt.rank * micro:(rt.rank + 1) * micro].clone())
    engine.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in cache:
            ids = ids.to(rt.device)
            total += float(engine(input_ids=ids, labels=ids).loss.float())
            n += 1
    engine.train()
    if not n:
        return None
    s, count = sum_across_ranks([total / n, 1.0], rt.device)
    return s / count


def _padded_cache(rt: Runtime, spec: LoopSpec, micro: int) -> list[Any]:
    """This rank's share of the first held-out rows, collated in micro batches (every rank the same count)."""
    index = ShardIndex.of(spec.val_files)
    per_rank = min(index.rows, spec.train.eval_batches * micro * rt.world_size) // rt.world_size
    rows: dict[str, list[Any]] = {c: [] for c in spec.columns}
    for block in read_rows(index, rt.rank * per_rank, (rt.rank + 1) * per_rank, spec.columns):
        for c in spec.columns:
            rows[c].extend(block[c])
    collate = collate_padded(int(spec.pad_id or 0))
    return [collate({c: v[i:i + micro] for c, v in rows.items()}) for i in range(0, per_rank, micro)]


def _evaluate_padded(engine: Any, rt: Runtime, spec: LoopSpec, micro: int, cache: list[Any]) -> float | None:
    """Token-weighted loss over labelled tokens (assistant tokens for SFT) of the first held-out rows: summed
    nll over summed tokens across ranks, so a batch with few assistant tokens weighs only as much as it holds.
    """
    import torch

    if not cache:
        cache.extend(_padded_cache(rt, spec, micro))
        if not cache:
            return None
    engine.eval()
    nll, count = 0.0, 0.0
    with torch.no_grad():
        for batch in cache:
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            n = float((batch["labels"][:, 1:] != -100).sum())
            loss = engine(**batch).loss.float()
            if n:  # a batch without a labelled token has a NaN mean loss and no weight
                nll += float(loss) * n
                count += n
    engine.train()
    total, tokens = sum_across_ranks([nll, count], rt.device)
    return total / tokens if tokens else None
