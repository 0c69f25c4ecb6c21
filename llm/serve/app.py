"""The Serve application: one deployment (`LLMServer`, made by `server_deployment`) whose
replicas each hold the models and a continuous-batching engine per model, behind the OpenAI-compatible
FastAPI app.

`build_app` is the import path `serve run serve/local.yaml` / `serve deploy serve/config.yaml` call with
`args: {config, overrides}`; `build_application` is what `llmray serve` deploys. Both read the one
cluster config, so the YAML files only name which config to read (and the options derived from it).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from llm import sizing
from llm.config import LoadedConfig, PipelineConfig, ServeConfig
from llm.errors import ConfigError
from llm.loading import load_config
from llm.models.load import checked_model, chosen_model_dir, load_model, local_model
from llm.serve.engine import Engine
from llm.serve.metrics import request_recorder
from llm.serve.routes import create_app
from llm.serve.service import Service, key_digest
from llm.serve.vllm import build_vllm_app

if TYPE_CHECKING:
    from ray.serve import Application

APP_NAME = "llm"
PROXY_MARGIN_S = 5.0  # the proxy times out this much after the app does, so the app's answer arrives
DEPLOYMENT = "LLMServer"


def replica_threads(cfg: ServeConfig) -> int:
    """torch intra-op threads of a replica: `serve.threads`, else its reserved CPUs rounded up."""
    return cfg.threads or max(1, math.ceil(cfg.cpus_per_replica))


class LLMServer:
    """What a replica holds: every model loaded once, each with its engine, behind one FastAPI app."""

    def __init__(self, models: dict[str, str], serve_cfg: dict[str, Any], key_sha256: str | None) -> None:
        import torch

        cfg = ServeConfig.model_validate(serve_cfg)
        torch.set_num_threads(replica_threads(cfg))
        device = "cuda" if cfg.gpus_per_replica and torch.cuda.is_available() else "cpu"
        # A model in an object store is copied into this replica's node cache and checked against its manifest.
        engines = {name: Engine(load_model(local_model(path), device), cfg.max_batch_size,
                                on_finish=request_recorder(name), max_queued_tokens=cfg.max_queued_tokens)
                   for name, path in models.items()}
        self.service = Service(engines, cfg, key_sha256)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service)

    async def check_health(self) -> None:
        """Serve's health check, outside the request queue: each engine's loop is alive and stepping, and an
        idle model runs a one-token forward pass (raises when it cannot). A busy replica is not a sick one."""
        await self.service.check()


def server_deployment() -> Any:
    """The Serve deployment (a `serve.Deployment`) of `LLMServer`. Made here rather than decorated at the top
    of the module, so importing this module (the serve stage does, and `llm.cli` imports every stage) does not
    import Ray."""
    from ray import serve

    return serve.deployment(name=DEPLOYMENT)(serve.ingress()(LLMServer))


def model_dirs(cfg: PipelineConfig) -> dict[str, str]:
    """Served model name -> directory: `serve.model` (or the chosen variant) plus `serve.models`, each checked
    (`llm.models.load.checked_model`); a model in an object store stays a URI (each replica copies it)."""
    main = cfg.serve.model or chosen_model_dir(cfg)
    named = {cfg.serve.name or cfg.run: main, **cfg.serve.models}
    return {name: checked_model(path, "metadata.llm." + ("serve.model" if path == main else f"serve.models.{name}"))
            for name, path in named.items()}


def replica_bounds(cfg: ServeConfig, cpus: float, gpus: float) -> tuple[int, int]:
    """(min, max) replicas: the config's, else 1 and one per GPU (per replica's CPUs on CPU clusters)."""
    per = cfg.gpus_per_replica or 0
    default_max = int(gpus // per) if per and gpus else int(cpus // max(cfg.cpus_per_replica, 2.0))
    low = cfg.min_replicas if cfg.min_replicas is not None else 1
    high = cfg.max_replicas or max(1, low, default_max)
    return low, max(low, high)


def deployment_options(cfg: ServeConfig, cpus: float, gpus: float) -> dict[str, Any]:
    """The deployment's Serve options (the same in `serve/*.yaml` and in what `llmray serve` deploys)."""
    low, high = replica_bounds(cfg, cpus, gpus)
    actor: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica}
    if cfg.gpus_per_replica:
        actor["num_gpus"] = cfg.gpus_per_replica
    return {
        "max_ongoing_requests": cfg.ongoing_limit(),
        "max_queued_requests": cfg.max_queued_requests,
        "autoscaling_config": {"min_replicas": low, "max_replicas": high,
                               "target_ongoing_requests": cfg.target_ongoing_requests},
        "ray_actor_options": actor,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": 60.0,
    }


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's proxy options: bind address, port, request timeout. The app ends a request at
    `request_timeout_s` itself (OpenAI's error JSON, its generation cancelled); the proxy's own timeout is a
    backstop a little later."""
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + PROXY_MARGIN_S}


def api_key_digest(cfg: ServeConfig) -> str | None:
    """SHA-256 of the key in `serve.api_key_env` (replicas never see the key), or None when auth is off."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"metadata.llm.serve.api_key_env: environment variable {cfg.api_key_env} is not set "
                          "(or empty) where the app is built")
    return key_digest(key)


def build_application(cfg: PipelineConfig, cpus: float, gpus: float) -> Application:
    """The Serve application for a config, sized for a cluster with `cpus` and `gpus`."""
    if cfg.serve.engine == "vllm":
        return build_vllm_app(cfg, model_dirs(cfg), deployment_options(cfg.serve, cpus, gpus))
    options = deployment_options(cfg.serve, cpus, gpus)
    return server_deployment().options(**options).bind(model_dirs(cfg), cfg.serve.model_dump(mode="json"),
                                                       api_key_digest(cfg.serve))


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` are `config` (a cluster file) and `overrides` (dotted keys)."""
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"serve app args: unknown {sorted(unknown)}; expected config and overrides")
    loaded: LoadedConfig = load_config(args.get("config"), list(args.get("overrides") or []))
    derived = sizing.derive(loaded)
    return build_application(loaded.llm, derived.cluster_cpus, derived.cluster_gpus)
