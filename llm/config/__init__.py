"""The typed pipeline config: the `metadata.llm` section of a Ray cluster file.

One pydantic model per stage, `extra="forbid"` everywhere so a typo is an error that names the key.
Loading (`load_config`) reads the cluster file, applies dotted overrides, validates both halves and
raises `ConfigError` with a one-line message: dotted key, problem, file.

One pydantic module per section (`data`, `train`, `sweep`, `compress`, `serve`) and the root in
`pipeline`; this package imports no stage code.
"""

from __future__ import annotations

from pathlib import Path

from llm.config.base import LLM_PREFIX, STAGE_SECTIONS, Section
from llm.config.compress import CompressConfig
from llm.config.data import (
    DataConfig,
    DedupConfig,
    FuzzyDedupConfig,
    LanguageConfig,
    PiiConfig,
    QualityConfig,
    SftConfig,
    TokenizerConfig,
)
from llm.config.pipeline import LoadedConfig, PipelineConfig, PlanConfig, RayConfig
from llm.config.serve import ServeConfig
from llm.config.sweep import SweepConfig
from llm.config.train import (
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    ScheduleConfig,
    SizingOverride,
    TrainConfig,
)
from llm.errors import ConfigError

__all__ = [
    "LLM_PREFIX", "STAGE_SECTIONS", "Section", "CompressConfig", "DataConfig", "DedupConfig", "FuzzyDedupConfig",
    "LanguageConfig", "PiiConfig", "QualityConfig", "SftConfig", "TokenizerConfig", "LoadedConfig", "PipelineConfig",
    "PlanConfig", "RayConfig", "ServeConfig", "SweepConfig", "FinetuneConfig", "ModelConfig", "PretrainConfig",
    "ScheduleConfig", "SizingOverride", "TrainConfig", "ConfigError", "default_config_path", "load_config",
]


def default_config_path() -> Path:
    """`cluster/local.yaml` of the checkout (or the working directory)."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent.parent):
        candidate = base / "cluster" / "local.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError("no config given and cluster/local.yaml not found in the working directory")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LoadedConfig:
    """Load, override and validate a cluster file. Raises `ConfigError` naming the key and the file."""
    from llm.loading import load

    return load(Path(path) if path is not None else default_config_path(), list(overrides))
