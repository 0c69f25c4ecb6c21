"""The typed pipeline config: the `metadata.llm` section of a Ray cluster file.

One pydantic model per stage, `extra="forbid"` everywhere so a typo is an error that names the key.
Loading (`load_config`) reads the cluster file, applies dotted overrides, validates both halves and
raises `ConfigError` with a one-line message: dotted key, problem, file.

One pydantic module per section (`data`, `train`, `sweep`, `compress`, `serve`) and the root in
`pipeline`; this package imports no stage code.
"""

from __future__ import annotations

from llm.config.base import LLM_PREFIX, Section
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
from llm.config.tracking import MlflowConfig, TrackingConfig, WandbConfig
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
    "LLM_PREFIX", "Section", "CompressConfig", "DataConfig", "DedupConfig", "FuzzyDedupConfig",
    "LanguageConfig", "PiiConfig", "QualityConfig", "SftConfig", "TokenizerConfig", "LoadedConfig", "PipelineConfig",
    "PlanConfig", "RayConfig", "ServeConfig", "SweepConfig", "FinetuneConfig", "ModelConfig", "PretrainConfig",
    "ScheduleConfig", "SizingOverride", "TrainConfig", "ConfigError", "MlflowConfig", "TrackingConfig", "WandbConfig",
]
