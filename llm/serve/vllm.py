"""The GPU route: `serve.engine: vllm` serves the same model directories through `ray.serve.llm`.

`ray.serve.llm` brings its own OpenAI-compatible app (paged attention, continuous batching on GPU);
this module only maps the config onto it. What vLLM cannot serve is refused in one line before vLLM is
imported: a cluster without GPUs, our CPU int8 variants, a missing vLLM install.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from llm.config import PipelineConfig
from llm.errors import ConfigError
from llm.models.load import is_int8_variant
from llm.sizing import planned

if TYPE_CHECKING:
    from ray.serve import Application


def require_vllm() -> None:
    """Raise a one-line `ConfigError` unless vLLM is importable."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("metadata.llm.serve.engine: vllm is not installed here (it needs GPUs and "
                          "`pip install ray[llm]`); use engine: torch on this machine")


def check_vllm_config(cfg: PipelineConfig, models: dict[str, str]) -> None:
    """Refuse, in one line naming `serve.engine`, what vLLM cannot serve; runs before vLLM is needed.

    Args:
        cfg: the pipeline config; its cluster file's node types are the GPU count (`llm.sizing.planned`).
        models: served name -> model directory or object-store URI, as `model_dirs` gives them.

    Raises:
        ConfigError: the node types offer no GPUs, a model is an int8-dynamic variant, or an API key is set.
    """
    # The node types, not the live cluster: GPU nodes may start on demand, after this check.
    gpus = planned(cfg).cluster_gpus
    if gpus <= 0:
        raise ConfigError("metadata.llm.serve.engine: vllm needs GPUs and the cluster offers none (no GPU in "
                          "its node types' resources, or on this machine for a local cluster); use engine: torch")
    for name, path in models.items():
        if is_int8_variant(path):
            raise ConfigError(f"metadata.llm.serve.engine: vllm cannot load model {name!r} ({path}): it is an "
                              "int8-dynamic variant (torch.ao dynamic int8, CPU only); use engine: torch or "
                              "serve a non-int8 variant")
    if cfg.serve.api_key_env is not None:
        raise ConfigError("metadata.llm.serve.api_key_env: not supported with engine: vllm; put the endpoint "
                          "behind an authenticating proxy")


def build_vllm_app(cfg: PipelineConfig, models: dict[str, str], options: dict[str, Any]) -> Application:
    """An OpenAI app from `ray.serve.llm` serving each model directory, scaled as the config says."""
    check_vllm_config(cfg, models)
    require_vllm()
    from ray.serve.llm import LLMConfig, build_openai_app

    deployment = {"autoscaling_config": options["autoscaling_config"],
                  "max_ongoing_requests": options["max_ongoing_requests"]}
    configs = [LLMConfig(model_loading_config={"model_id": name, "model_source": path},
                         deployment_config=deployment,
                         engine_kwargs={"max_num_seqs": cfg.serve.max_batch_size})
               for name, path in models.items()]
    return build_openai_app({"llm_configs": configs})
