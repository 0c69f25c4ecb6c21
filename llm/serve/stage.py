"""The serve stage: deploy the chosen model on Ray Serve and record the endpoint.

It attaches to a Ray only when `ray.address` (or `RAY_ADDRESS`) names one: there the application stays up
after the command (Serve's controller is detached) and the command says how to stop it. Otherwise it starts
its own Ray, even beside another one running on the machine, and keeps the endpoint up in the foreground
until Ctrl-C. What Serve actually bound is read back: a Serve already running keeps its first host and port
(Ray only logs that it ignored new ones), so a mismatch is an error, never a wrong `endpoint.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from llm import storage
from llm.config import PipelineConfig
from llm.errors import ClusterError
from llm.raycluster import HAPROXY_ENV, connect, use_serve_ingress
from llm.serve.app import APP_NAME, build_application, http_options, model_dirs
from llm.serve.vllm import check_vllm_config, require_vllm
from llm.stage import Stage, StageResult, execute

ENDPOINT = "endpoint.json"


def _started_ray_here() -> bool:
    """Whether this process started the Ray it is connected to (its node is a head, not a connection)."""
    from ray._private import worker  # private: Ray offers no public "did I start this cluster" call

    node = getattr(worker, "_global_node", None)
    return bool(node is not None and getattr(node, "head", False))


def base_url(cfg: PipelineConfig) -> str:
    """The URL clients use (`0.0.0.0` binds everywhere; locally it is reached on 127.0.0.1)."""
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}/v1"


def curl_example(cfg: PipelineConfig, model: str) -> str:
    """A ready-to-paste request against the endpoint."""
    auth = f' -H "Authorization: Bearer ${cfg.serve.api_key_env}"' if cfg.serve.api_key_env else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
    return f"curl -s {base_url(cfg)}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def deploy(cfg: PipelineConfig) -> dict[str, Any]:
    """Deploy (or update) the application on the connected Ray; returns what was deployed."""
    import ray
    from ray import serve

    resources = ray.cluster_resources()
    app = build_application(cfg, resources.get("CPU", 1.0), resources.get("GPU", 0.0))
    check_ingress(cfg)
    serve.start(http_options=http_options(cfg.serve))
    check_bound(cfg)
    t0 = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    models = model_dirs(cfg)
    return {"url": base_url(cfg), "models": models, "engine": cfg.serve.engine,
            "ready_s": round(time.perf_counter() - t0, 3)}


def bound_address() -> tuple[str, int]:
    """The host and port Serve's proxies actually bind (from its controller)."""
    from ray.serve.context import _get_global_client  # private: Serve has no public getter for its HTTP options

    client = _get_global_client()
    if client is None:
        raise ClusterError("serve: Serve is not running on this Ray after serve.start")
    http = client.http_config
    return str(http.host), int(http.port)


def check_bound(cfg: PipelineConfig) -> None:
    """A Serve already running on this Ray keeps its host and port; refuse to record another URL."""
    host, port = bound_address()
    if (host, port) != (cfg.serve.host, cfg.serve.port):
        raise ClusterError(f"metadata.llm.serve: Serve on this Ray already listens on {host}:{port}, not "
                           f"{cfg.serve.host}:{cfg.serve.port} as configured; set serve.host/serve.port to match, "
                           "or `serve shutdown -y` first")


def check_ingress(cfg: PipelineConfig) -> None:
    """`serve.ingress: haproxy` on a Ray whose processes were started without its settings would silently
    serve through the proxy: refuse, saying how to start the cluster."""
    import ray

    if cfg.serve.ingress != "haproxy":
        return

    @ray.remote(num_cpus=0)
    def ha_proxy_on() -> bool:  # a worker has the raylet's environment, as Serve's controller and replicas do
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"

    if not ray.get(ha_proxy_on.remote()):
        env = " ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items())
        raise ClusterError("metadata.llm.serve.ingress is haproxy, but this Ray was started without it (Serve reads "
                           f"it when Ray starts): start the cluster with {env} in the environment of `ray start` "
                           "on every node, or set serve.ingress: proxy")


def run(cfg: PipelineConfig, force: bool = False) -> StageResult:
    """Serve the chosen model (or `serve.model`) behind the OpenAI-compatible API.

    Always deploys: serving is a state of the cluster, not a file, so a matching manifest cannot prove
    the endpoint is up. `force` is accepted for the stage contract. The manifest records the endpoint.
    """
    del force
    models = model_dirs(cfg)  # a missing model is a config error before Ray starts
    if cfg.serve.engine == "vllm":  # what vLLM cannot serve is refused before Ray starts, too
        check_vllm_config(cfg, models)
        require_vllm()
    print(f"serve: {', '.join(f'{k} <- {v}' for k, v in models.items())}", flush=True)
    attach = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    import ray

    if not attach and not ray.is_initialized():
        use_serve_ingress(cfg)  # before Serve is imported here: this process reads the same settings
    import ray.serve  # Serve sets its driver logger up when imported: before connect() takes it over

    connect(cfg, join_running=False, log_to_driver=False)  # per-request logs stay in Serve's replica logs
    started_here = _started_ray_here()

    def body(folder: storage.Folder) -> dict[str, Any]:
        info = deploy(cfg)
        folder.write_text(ENDPOINT, json.dumps(info, indent=2))
        return info

    # With `storage` in an object store, endpoint.json is staged here and uploaded; replicas copy the model.
    result = execute(cfg, STAGE, body, force=True)
    name = next(iter(models))
    print(f"serve: ready in {result.metrics['ready_s']:.1f}s at {base_url(cfg)} (models: {', '.join(models)})\n"
          f"  {curl_example(cfg, name)}", flush=True)
    if cfg.serve.foreground if cfg.serve.foreground is not None else started_here:
        _hold()
    elif not started_here:
        where = attach or "the Ray this process is connected to"
        print(f"serve: attached to {where}; the app stays up after this command. Stop it with "
              f"`serve delete {APP_NAME}` (or `serve shutdown -y`; add --address <dashboard URL> off the head node)",
              flush=True)
    return result


def _hold() -> None:
    """Keep this process (and the Ray it started) alive until Ctrl-C, then shut Serve down."""
    import signal

    from ray import serve

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Training libraries loaded earlier in this process (the whole route runs in one) may have replaced
    # Python's SIGINT handler with one that does not raise: Ctrl-C and `kill` must still stop serving.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("serve: running in the foreground; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("serve: shutting down", flush=True)
    finally:
        serve.shutdown()


STAGE = Stage("serve", "OpenAI-compatible endpoint (Ray Serve)", run, sections=("serve",), record_only=True,
              foreground=True)
