"""The stage registry: every stage of the pipeline, in pipeline order, each declared once in its own module.

A stage module ends with `STAGE = Stage(name, what, run, sections, inputs, ...)` (`llm.stage.Stage`); this
list is the only place that names them all. The CLI verbs, `llmray run`'s order, `jobs/`, `llmray status`
and the report derive from it, so a reader follows `llmray run` from `llm.cli.cmd_run` to `run_stage` here,
to the stage module's `run`, to `llm.stage.execute`.
"""

from __future__ import annotations

from llm.compress import stage as compress
from llm.config import PipelineConfig
from llm.console import stage_console
from llm.data import stage as data
from llm.errors import ConfigError
from llm.serve import stage as serve
from llm.stage import Stage, StageResult
from llm.tracking import pipeline_run, tracked
from llm.train import finetune, pretrain
from llm.tune import stage as sweep

STAGES: tuple[Stage, ...] = (data.STAGE, sweep.STAGE, pretrain.STAGE, finetune.STAGE, compress.STAGE, serve.STAGE)
"""Every stage, in pipeline order (the sweep moves to just before the stage it sweeps for)."""


def by_name(name: str) -> Stage:
    """The stage called `name`."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ConfigError(f"no stage {name!r} (stages: {', '.join(s.name for s in STAGES)})")


def stages_to_run(cfg: PipelineConfig) -> list[str]:
    """The enabled stages `llmray run` will run, in order."""
    names = [stage.name for stage in STAGES if stage.enabled(cfg)]
    if "sweep" in names:  # the sweep runs right before the stage it sweeps for (pretrain or finetune)
        names.remove("sweep")
        target = cfg.sweep.target
        names.insert(names.index(target) if target in names else 0, "sweep")
    return names


def run_stage(cfg: PipelineConfig, name: str, force: bool = False, verbose: bool = False,
              quiet: bool = False) -> StageResult:
    """Run one stage (its own skip-if-done applies) under the calm console; `quiet` skips the routing
    (library callers and tests that capture output themselves). With `tracking` on, the stage is a run in
    MLflow / W&B (`llm.tracking`), nested under its pipeline's."""
    stage = by_name(name)
    if quiet:
        return tracked(cfg, stage, lambda: stage.run(cfg, force=force))
    with stage_console(cfg, stage.name, stage.what, verbose):
        return tracked(cfg, stage, lambda: stage.run(cfg, force=force))


def run_pipeline(cfg: PipelineConfig, force: bool = False, verbose: bool = False,
                 quiet: bool = True) -> list[StageResult]:
    """Run every enabled stage in order, under one tracking run (`llm.tracking.pipeline_run`); `force` reruns
    stages whose manifests match."""
    with pipeline_run(cfg):
        return [run_stage(cfg, name, force=force, verbose=verbose, quiet=quiet) for name in stages_to_run(cfg)]
