"""The GPU route: `serve.engine: vllm` serves the same model directories through `ray.serve.llm`.

`ray.serve.llm` brings its own OpenAI-compatible app (paged attention, continuous batching on GPU);
this module only maps the config onto it. Where vLLM is missing, the setting is a one-line error.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ray.serve import Application

from llm.config import PipelineConfig
from llm.errors import ConfigError


def require_vllm() -> None:
    """Raise a one-line `ConfigError` unless vLLM is importable."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("metadata.llm.serve.engine: vllm is not installed here (it needs GPUs and "
                          "`pip install ray[llm]`); use engine: torch on this machine")


def build_vllm_app(cfg: PipelineConfig, models: dict[str, str], options: dict[str, Any]) -> Application:
    """An OpenAI app from `ray.serve.llm` serving each model directory, scaled as the config says."""
    require_vllm()
    if cfg.serve.api_key_env is not None:
        raise ConfigError("metadata.llm.serve.api_key_env: not supported with engine: vllm; put the endpoint "
                          "behind an authenticating proxy")
    from ray.serve.llm import LLMConfig, build_openai_app

    deployment = {"autoscaling_config": options["autoscaling_config"],
                  "max_ongoing_requests": options["max_ongoing_requests"]}
    configs = [LLMConfig(model_loading_config={"model_id": name, "model_source": path},
                         deployment_config=deployment,
                         engine_kwargs={"max_num_seqs": cfg.serve.max_batch_size})
               for name, path in models.items()]
    return build_openai_app({"llm_configs": configs})
