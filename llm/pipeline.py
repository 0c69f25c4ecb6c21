"""The main job: every enabled stage that exists, in order, each skipped when its manifest matches."""

from __future__ import annotations

import importlib

from llm.config import PipelineConfig
from llm.stage import StageResult

# Stage name -> "module:function" of its `run(cfg, force) -> StageResult`, in pipeline order.
# A later issue adds its stage here; `llmray run` picks it up.
STAGES: dict[str, str] = {
    "data": "llm.data.stage:run",
    "pretrain": "llm.train.stage:run",
}


def stage_runner(name: str):  # noqa: ANN201 - returns the stage's run function
    """Import a stage's `run` function by name."""
    module, _, func = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), func)


def run_stage(cfg: PipelineConfig, name: str, force: bool = False) -> StageResult:
    """Run one stage (its own skip-if-done applies)."""
    result: StageResult = stage_runner(name)(cfg, force=force)
    return result


def run_pipeline(cfg: PipelineConfig, force: bool = False) -> list[StageResult]:
    """Run every enabled stage in order; `force` reruns stages whose manifests match."""
    results = []
    for name in STAGES:
        if getattr(cfg, name).enabled:
            results.append(run_stage(cfg, name, force=force))
    return results
