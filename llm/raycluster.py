"""Reaching Ray: the configured address, a running cluster, or a local one sized for small machines.

Connecting also sets Ray's output up for the calm console (`llm.console`), on Ray's own terms:
- Ray's driver-side Python loggers (`ray`, and `ray.data`, `ray.serve`, which get their own terminal
  handler when imported) lose their terminal handlers and propagate to the root logger, where the
  console's handlers decide: the stage log, and the terminal too under `--verbose`.
- Workers' stdout/stderr still reach the driver (`log_to_driver=True`), but Ray's own printer is taken off
  its dispatcher (`global_worker_stdstream_dispatcher`): whoever listens there (the console) decides.
- Progress bars are off: Ray Data's (`DataContext.enable_progress_bars`) and tqdm's in workers
  (`TQDM_DISABLE` through the job's `runtime_env`); the stage's live line is the progress.
"""

from __future__ import annotations

import os
from typing import Any

from llm.config import PipelineConfig
from llm.console import through_root
from llm.errors import ClusterError


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _running_gcs() -> list[str]:
    """GCS addresses of Ray clusters running on this machine (what `ray.init(address="auto")` would join)."""
    from ray._private import services

    try:
        return sorted(services.find_gcs_addresses())
    except Exception:  # a process table we cannot read: behave as if none were running
        return []


def connect(cfg: PipelineConfig, join_running: bool = True, **init_kwargs: Any) -> None:
    """`ray.init` once per process.

    Order: `ray.address` from the config, else `RAY_ADDRESS` (set inside `ray job submit`), else a
    cluster already running on this machine (unless `join_running` is false: serving starts its own rather
    than leave an app in somebody else's Ray), else a new local Ray with `ray.num_cpus` logical CPUs
    (more than the cores, so Train workers and Ray Data's tasks both get scheduled on 2 cores).
    A cluster that exists but refuses the connection (token auth, a different Ray version) is an error
    that says why, never a silent private cluster beside it.
    """
    import ray

    quiet_ray_loggers()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "runtime_env": {"env_vars": _worker_env()}, **init_kwargs}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        source = "metadata.llm.ray.address" if cfg.ray.address else "RAY_ADDRESS"
        try:
            _init(address=address, **kwargs)
        except Exception as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address} ({source}): "
                               f"{_first_line(e)}{_auth_hint(e)}") from None
        return
    running = _running_gcs() if join_running else []
    if running:
        try:
            _init(address="auto", **kwargs)
        except Exception as e:
            raise ClusterError(f"a Ray cluster is running on this machine ({', '.join(running)}) but connecting "
                               f"to it failed: {_first_line(e)}{_auth_hint(e)}; fix that, or `ray stop` it to let "
                               "llmray start its own") from None
        return
    # "local": a new cluster even where another runs (plain `ray.init()` would join it).
    use_serve_ingress(cfg)
    _init(address="local", num_cpus=cfg.ray.num_cpus, **kwargs)


HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
"""What `serve.ingress: haproxy` needs in the environment of every Ray process (Serve reads it at import:
its controller, HAProxy manager and replicas inherit it from the raylet); a cluster's `ray start` sets it."""
_LOCAL_DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2", "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "2"}
"""Beside it where llmray starts Ray: one machine's HAProxy learns of a leaving replica at once, so no 30 s
drain before Ctrl-C ends."""


def use_serve_ingress(cfg: PipelineConfig) -> None:
    """Set `serve.ingress`'s Serve settings in this process's environment, before Ray (and Serve) start
    here; what the user's environment already sets wins."""
    if cfg.serve.ingress == "haproxy":
        for key, value in {**HAPROXY_ENV, **_LOCAL_DRAIN_ENV}.items():
            os.environ.setdefault(key, value)


_WORKER_ENV = {"TQDM_DISABLE": "1"}
"""Set in every worker of the job: a tqdm bar forwarded from a worker is a stream of carriage returns."""


def _worker_env() -> dict[str, str]:
    """`_WORKER_ENV` less what this driver's environment sets already (a job submitted with its own
    `env_vars` has them here too, and Ray refuses a ray.init `env_vars` key the job also sets)."""
    return {k: v for k, v in _WORKER_ENV.items() if k not in os.environ}


def _init(**kwargs: Any) -> None:
    """`ray.init`, then Ray's terminal printer of worker output off its dispatcher (the console listens
    there and writes worker lines to the stage log; with `--verbose`, through Ray's printer too)."""
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    ray.init(**kwargs)
    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")  # the name ray.init registers it by


def quiet_ray_loggers() -> None:
    """Ray's driver-side loggers log through the root logger (`llm.console.through_root`) and Ray Data
    shows no progress bars. Idempotent. Ray's libraries set their loggers up when first imported, so Ray
    Data (which Train and Tune import too) is imported here first; the serve stage imports Serve before
    connecting."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    through_root("ray")



def _auth_hint(e: BaseException) -> str:
    text = str(e).lower()
    if "auth" in text or "token" in text or "unauthenticated" in text:
        return " (token auth: set RAY_AUTH_MODE=token and make ~/.ray/auth_token the cluster's token)"
    if "version" in text:
        return " (the driver's Ray and Python versions must match the cluster's)"
    return ""


def reserve(sizing: Any, timeout_s: float, stage: str) -> None:
    """Ask Ray for the planned workers' resources and wait until they exist.

    A placement group with one bundle per worker is a resource request the autoscaler acts on (it starts
    GPU nodes whose `min_workers` is 0); the group is removed once ready, and Ray Train's own group takes
    the same room. Waiting shows a live line with what is missing; past `timeout_s` it is an error naming
    the shortfall, not a smaller run with a different global batch.
    """
    import sys
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    kwargs = sizing.scaling_config_kwargs()
    bundles = [dict(kwargs["resources_per_worker"]) for _ in range(kwargs["num_workers"])]
    strategy = kwargs["placement_strategy"]
    want = f"{len(bundles)} workers x {bundles[0]}" if bundles else "nothing"
    pg = placement_group(bundles, strategy=strategy, name=f"llmray-{stage}-reserve")
    t0, shown = time.monotonic(), False
    try:
        while not _ready(pg, 5.0):
            waited = time.monotonic() - t0
            have = ray.cluster_resources()
            line = (f"[{stage}] waiting for the cluster: {want} ({strategy}); it has {have.get('CPU', 0):g} CPUs, "
                    f"{have.get('GPU', 0):g} GPUs now; {waited:.0f}s of {timeout_s:.0f}s")
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
            shown = True
            if waited >= timeout_s:
                raise ClusterError(
                    f"{stage}: the cluster did not reach the planned {want} ({strategy}) within "
                    f"{timeout_s:.0f}s (ray.resource_timeout_s); it has {have.get('CPU', 0):g} CPUs and "
                    f"{have.get('GPU', 0):g} GPUs. Check the autoscaler and max_workers of the node types, "
                    "or lower the stage's sizing.workers (and global_batch_size) on purpose")
    finally:
        if shown:
            sys.stdout.write("\n")
        remove_placement_group(pg)


def _ready(pg: Any, seconds: float) -> bool:
    import ray

    ready, _ = ray.wait([pg.ready()], timeout=seconds)
    return bool(ready)
