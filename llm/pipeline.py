"""The main job: every enabled stage that exists, in order, each skipped when its manifest matches."""

from __future__ import annotations

import importlib

from llm.config import LLM_PREFIX, PipelineConfig
from llm.errors import ConfigError
from llm.stage import StageResult

# Stage name -> "module:function" of its `run(cfg, force) -> StageResult`, in pipeline order.
# A later issue adds its stage here; `llmray run` picks it up.
STAGES: dict[str, str] = {
    "data": "llm.data.stage:run",
    "sweep": "llm.tune.stage:run",
    "pretrain": "llm.train.stage:run",
    "finetune": "llm.train.finetune:run",
    "compress": "llm.compress.stage:run",
    "serve": "llm.serve.stage:run",
}


def stages_to_run(cfg: PipelineConfig) -> list[str]:
    """The enabled stages `llmray run` will run, in order; an enabled stage this version does not have is
    an error before any work starts (what `llmray validate` reports too)."""
    missing = [name for name in cfg.enabled_stages() if name not in STAGES]
    if missing:
        keys = ", ".join(f"{LLM_PREFIX}.{name}.enabled" for name in missing)
        raise ConfigError(f"{keys}: the {', '.join(missing)} stage{'s are' if len(missing) > 1 else ' is'} not "
                          f"built in this version of llmray (stages: {', '.join(STAGES)}); set enabled: false")
    names = [name for name in STAGES if name in cfg.enabled_stages()]
    if "sweep" in names:  # the sweep runs right before the stage it sweeps for (pretrain or finetune)
        names.remove("sweep")
        target = cfg.sweep.target
        names.insert(names.index(target) if target in names else 0, "sweep")
    return names


def stage_runner(name: str):  # noqa: ANN201 - returns the stage's run function
    """Import a stage's `run` function by name."""
    module, _, func = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), func)


# What each stage does, for its header line.
WHAT: dict[str, str] = {
    "data": "read, clean, dedup, train a tokenizer, pack (Ray Data)",
    "sweep": "learning-rate schedules (Ray Tune over Ray Train runs)",
    "pretrain": "train the model (Ray Train + DeepSpeed)",
    "finetune": "chat fine-tuning (Ray Train + DeepSpeed)",
    "compress": "quantize, prune, distil, evaluate, choose",
    "serve": "OpenAI-compatible endpoint (Ray Serve)",
}


def run_stage(cfg: PipelineConfig, name: str, force: bool = False, verbose: bool = False,
              quiet: bool = False) -> StageResult:
    """Run one stage (its own skip-if-done applies) under the calm console; `quiet` skips the routing
    (library callers and tests that capture output themselves)."""
    from llm.console import stage_console

    if quiet:
        result: StageResult = stage_runner(name)(cfg, force=force)
        return result
    with stage_console(cfg, name, WHAT.get(name, name), verbose):
        result = stage_runner(name)(cfg, force=force)
    return result


def run_pipeline(cfg: PipelineConfig, force: bool = False, verbose: bool = False,
                 quiet: bool = True) -> list[StageResult]:
    """Run every enabled stage in order; `force` reruns stages whose manifests match."""
    return [run_stage(cfg, name, force=force, verbose=verbose, quiet=quiet) for name in stages_to_run(cfg)]
