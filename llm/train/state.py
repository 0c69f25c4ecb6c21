"""The loop state a checkpoint records and a resume reads back, typed.

`loop_state.json` is `LoopState.to_json()`: the same keys a reader of a checkpoint folder sees, and what
`LoopState.from_json` reads back (an older checkpoint's missing keys take their defaults).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Layout:
    """How the rest of an epoch that another world size began is dealt out (`llm.train.data.rest_layout`)."""

    world: int
    """The world size that began the epoch."""
    accum: int
    """Its gradient accumulation steps."""
    position: int
    """Micro-batches each of its ranks had read of the epoch."""
    parent: Layout | None = None
    """The epoch's own layout when a world change began it too."""

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> Layout | None:
        if value is None:
            return None
        return cls(int(value["world"]), int(value["accum"]), int(value["position"]),
                   cls.from_json(value.get("parent")))


@dataclass
class LoopState:
    """Where the loop is: step, data position, tokens seen; a checkpoint adds who saved it and how."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    """Micro-batches each rank consumed this epoch (the same on every rank: they step together)."""
    tokens: int = 0
    layout: Layout | None = None
    """The current epoch's layout after a world-size change; None: contiguous slices."""
    micro: int | None = None
    """Micro batch size and accumulation steps of the run: a resume on another world size keeps the global batch."""
    accum: int | None = None
    world_size: int | None = None
    data_id: str | None = None
    """Identity of the training data (its manifest hash): the data position carries over only for the same."""
    rank0_next: dict[str, Any] | None = None
    """(shard, row) of rank 0's next batch, for people reading the checkpoint."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> LoopState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in value.items() if k in known})
        state.layout = Layout.from_json(value.get("layout"))
        return state
