"""The serve section: the Ray Serve OpenAI-compatible application."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llm.config.base import Section

LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Hosts only this machine reaches."""


class ServeConfig(Section):
    """Ray Serve OpenAI-compatible application: model, HTTP, batching, scaling and safety knobs."""

    enabled: bool = False
    """Run this stage in `llmray run`."""
    model: str | None = None
    """A local Hugging Face directory or compress variant folder to serve; default: the variant that
    `compress/chosen.json` names (else `finetune/model`, else `pretrain/model`). Nothing is downloaded."""
    models: dict[str, str] = Field(default_factory=dict)
    """Extra models served side by side: name -> local directory. `/v1/models` lists them all."""
    name: str | None = None
    """The model id clients send as `model`; default: the run name."""
    engine: Literal["torch", "vllm"] = "torch"
    """`torch`: this package's continuous-batching engine (CPU or GPU). `vllm`: `ray.serve.llm` (GPU only,
    needs vLLM installed)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; set `0.0.0.0` only behind a firewall or with `api_key_env`."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of Serve's proxy."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key; requests without `Authorization: Bearer <key>`
    get 401. The variable must be set where the app is built (the `serve run` shell, or the cluster)."""
    min_replicas: int | None = Field(None, ge=0)
    """Autoscaling lower bound; default 1."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling upper bound; default: one per GPU (or per 2 CPUs on CPU clusters)."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling target of in-flight requests per replica."""
    max_batch_size: int = Field(16, ge=1, le=1024)
    """Sequences decoded together in one forward pass (the running batch of continuous batching)."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Requests a replica holds at once (running + waiting to join the batch); default 2 x max_batch_size.
    Must be >= max_batch_size or the batch never fills."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests queued in Serve's router beyond `max_ongoing_requests` before it answers 503 (-1: no bound)."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A request still generating after this many seconds is cancelled and answered 504 (OpenAI's error JSON;
    an error event once streaming); Serve's proxy times out a few seconds later as a backstop."""
    max_tokens: int = Field(1024, ge=1)
    """Upper bound of a request's `max_tokens` (and the chat default); larger asks get 400."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Request bodies larger than this get 413 (counted while the body is read, never buffered past it)."""
    max_prompts: int = Field(256, ge=1)
    """Sequences one request may ask for (prompts x `n`, or x `best_of`); more get 400."""
    max_queued_tokens: int = Field(65_536, ge=1)
    """Prompt tokens a replica holds waiting to join the batch; a request that would pass it gets 429 (one
    client's 200,000 prompts cannot queue ahead of everyone)."""
    allow_open: bool = False
    """Allow a host other than loopback without `api_key_env` (anyone who reaches the port can use it)."""
    cpus_per_replica: float = Field(1.0, gt=0)
    """CPUs each replica reserves."""
    gpus_per_replica: float = Field(0.0, ge=0)
    """GPUs each replica reserves (0 on CPU clusters)."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads per replica; default: `cpus_per_replica` rounded up."""
    health_check_period_s: float = Field(10.0, gt=0)
    """How often Serve runs the health check (the engine's loop is alive and stepping; idle: a one-token
    forward outside the request queue)."""
    foreground: bool | None = None
    """Keep `llmray serve` running until Ctrl-C; default: only when the command started Ray itself."""
    ingress: Literal["proxy", "haproxy"] = "proxy"
    """How HTTP reaches the replicas. `proxy`: Serve's HTTP proxy actor (Python) routes every request.
    `haproxy`: Serve's HAProxy ingress with its throughput settings (`RAY_SERVE_ENABLE_HA_PROXY=1`,
    `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`): HAProxy forwards straight to each replica's own HTTP server, about
    1 ms over an in-process call here against 5-8 ms through the proxy. It also opens HAProxy's stats page
    on port 8404 of every interface (`RAY_SERVE_HAPROXY_STATS_PORT` moves it). Serve reads these settings
    when Ray starts: set where llmray starts Ray; a cluster you attach to must be started with them."""

    @model_validator(mode="after")
    def _ongoing_fills_batch(self) -> ServeConfig:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}) or batches never fill")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.host not in LOOPBACK and self.api_key_env is None and not self.allow_open:
            raise ValueError(f"host {self.host!r} opens the endpoint beyond this machine without an API key: set "
                             "api_key_env (or allow_open: true to serve it open on purpose)")
        return self

    def ongoing_limit(self) -> int:
        """`max_ongoing_requests` actually used."""
        return self.max_ongoing_requests or 2 * self.max_batch_size
