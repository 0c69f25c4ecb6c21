"""Operations: serve/*.yaml are current and start, overload answers 503 fast, a killed replica is replaced."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from llm.serve.serveconfig import FILES, ROOT, render
from tests.conftest import tiny_config
from tests.serve.conftest import serve_overrides


@pytest.mark.parametrize("target", sorted(FILES))
def test_serve_files_are_current(target: str) -> None:
    assert (ROOT / target).read_text() == render(FILES[target]), "run `python -m llm.serve.serveconfig`"


@pytest.mark.ray
def test_serve_run_local_yaml_starts(served, tiny_model_dir: Path, serve_port: int, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What `serve run serve/local.yaml` does, in this session's Ray: Serve validates the file, imports the
    builder, calls it with the file's args; the app it builds carries the file's deployment options."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.chdir(ROOT)  # the file's config path is relative to the checkout, as `serve run` is run there
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve/local.yaml").read_text()))
    app_cfg = schema.applications[0]
    args = dict(app_cfg.args)
    # Only where the model and storage live differ from cluster/local.yaml in a test.
    args["overrides"] = [*args["overrides"], f"storage={tmp_path}", f"serve.model={tiny_model_dir}",
                         "serve.name=tiny"]
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path), args)
    want = app_cfg.deployments[0].model_dump(exclude_unset=True)
    got = app._bound_deployment._deployment_config
    assert got.max_ongoing_requests == want["max_ongoing_requests"]
    assert got.autoscaling_config.max_replicas == want["autoscaling_config"]["max_replicas"]
    serve.run(app, name="from-yaml", route_prefix="/from-yaml")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/from-yaml/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
    finally:
        serve.delete("from-yaml")


@pytest.mark.ray
def test_overload_answers_503_quickly(served, tiny_model_dir: Path, serve_port: int, tmp_path: Path) -> None:
    from ray import serve

    from llm.serve.app import build_application

    cfg = tiny_config(tmp_path, *serve_overrides(
        tiny_model_dir, serve_port, "serve.max_batch_size=1", "serve.max_ongoing_requests=1",
        "serve.max_queued_requests=1")).llm
    serve.run(build_application(cfg, 4, 0), name="small", route_prefix="/small")
    url = f"http://127.0.0.1:{serve_port}/small/v1/completions"

    def one(_: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": 120}, timeout=60)
        return r.status_code, time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
    finally:
        serve.delete("small")
    codes = [c for c, _ in results]
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}
    assert max(s for c, s in results if c == 503) < 2.0


@pytest.mark.ray
def test_request_timeout_is_504_json_and_frees_the_replica(served, tiny_model_dir: Path, serve_port: int,
                                                           tmp_path: Path) -> None:
    """A request past `serve.request_timeout_s` is answered 504 with OpenAI's error JSON (an error event
    when streaming), and its generation leaves the batch: with room for one request at a time, the next
    short request is answered at once instead of waiting behind the abandoned one."""
    from ray import serve

    from llm.serve.app import build_application

    cfg = tiny_config(tmp_path, *serve_overrides(
        tiny_model_dir, serve_port, "serve.max_batch_size=1", "serve.max_ongoing_requests=1",
        "serve.request_timeout_s=0.3")).llm
    serve.run(build_application(cfg, 4, 0), name="deadline", route_prefix="/deadline")
    url = f"http://127.0.0.1:{serve_port}/deadline/v1/completions"
    # 8 prompts of 127 tokens each (the whole context), one at a time (batch size 1): seconds of work.
    long = {"model": "tiny", "prompt": list("abcdefgh"), "max_tokens": 127, "temperature": 0}
    try:
        # Warm up (the first forward pass of a fresh replica is slow), then time a long request.
        httpx.post(url, json={**long, "prompt": "x", "max_tokens": 1}, timeout=60)
        t0 = time.perf_counter()
        r = httpx.post(url, json=long, timeout=60)
        took = time.perf_counter() - t0
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and "serve.request_timeout_s" in r.json()["error"]["message"]
        assert took < 3.0
        with httpx.stream("POST", url, json={**long, "stream": True}, timeout=60) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert s.status_code == 200 and events[-1] == "data: [DONE]"
        assert '"code": "timeout"' in events[-2] or '"code":"timeout"' in events[-2], events[-2]
        short = httpx.post(url, json={**long, "prompt": "x", "max_tokens": 1}, timeout=60)
        assert short.status_code == 200, short.text
    finally:
        serve.delete("deadline")


def _replica_actor(app: str):
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), names[0]["name"]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_replica_is_replaced_and_endpoint_recovers(served, tiny_model_dir: Path, serve_port: int,
                                                          tmp_path: Path) -> None:
    import ray
    from ray import serve

    from llm.serve.app import build_application

    cfg = tiny_config(tmp_path, *serve_overrides(tiny_model_dir, serve_port)).llm
    serve.run(build_application(cfg, 4, 0), name="victim", route_prefix="/victim")
    url = f"http://127.0.0.1:{serve_port}/victim/v1/completions"
    log: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            started = time.monotonic()  # by start time: a request started after the kill needs a live replica
            try:
                code = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": 8}, timeout=30).status_code
            except httpx.HTTPError:
                code = -1
            log.append((started, code))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(1.0)
        actor, old_name = _replica_actor("victim")
        killed_at = time.monotonic()
        ray.kill(actor, no_restart=True)
        deadline = killed_at + 90
        while time.monotonic() < deadline and not any(t > killed_at + 0.5 and c == 200 for t, c in log[-5:]):
            time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
    try:
        assert any(c == 200 for t, c in log if t < killed_at), "no traffic before the kill"
        recovered = [t for t, c in log if t > killed_at + 0.5 and c == 200]
        assert recovered, f"no success after the kill: {log[-5:]}"
        assert _replica_actor("victim")[1] != old_name
    finally:
        serve.delete("victim")


@pytest.mark.ray
def test_a_running_serve_on_another_port_is_refused_not_recorded(served, tiny_model_dir: Path, serve_port: int,
                                                                 tmp_path: Path) -> None:
    """Serve keeps the host and port it started with and only logs new ones; the stage used to record the
    new URL in endpoint.json anyway. Now it reads back what Serve bound and refuses."""
    from llm.errors import ClusterError
    from llm.serve.stage import ENDPOINT, run

    other = serve_port + 1 if serve_port < 65535 else serve_port - 1
    loaded = tiny_config(tmp_path, *serve_overrides(tiny_model_dir, other))
    with pytest.raises(ClusterError, match=f"already listens on 127.0.0.1:{serve_port}"):
        run(loaded.llm)
    assert not list(Path(loaded.llm.storage).rglob(ENDPOINT))


def test_serve_starts_its_own_ray_unless_an_address_is_named(tmp_path: Path, tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`llmray serve` beside another Ray on the machine used to deploy into it and return; it starts its
    own unless `ray.address` or RAY_ADDRESS names one."""
    import ray

    from llm.raycluster import connect

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr("llm.raycluster._running_gcs", lambda: ["127.0.0.1:6379"])  # another Ray is running
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tiny_config(tmp_path, *serve_overrides(tiny_model_dir, 8000)).llm
    connect(cfg, join_running=False)
    assert calls[-1]["address"] == "local"
    connect(cfg)  # the training stages still join the running one
    assert calls[-1]["address"] == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    connect(cfg, join_running=False)
    assert calls[-1]["address"] == "127.0.0.1:6379"


def test_open_host_without_a_key_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from llm.errors import ConfigError

    with pytest.raises(ConfigError, match="serve.*0.0.0.0.*api_key_env"):
        tiny_config(tmp_path, *serve_overrides(tiny_model_dir, 8000), "serve.host=0.0.0.0")
    assert tiny_config(tmp_path, *serve_overrides(tiny_model_dir, 8000), "serve.host=0.0.0.0",
                       "serve.allow_open=true").llm.serve.allow_open


@pytest.mark.ray
def test_haproxy_ingress_answers_through_haproxy_and_stops_on_ctrl_c(ray_session, tmp_path: Path,
                                                                     tiny_model_dir: Path) -> None:
    """`serve.ingress: haproxy`: `llmray serve` starts its own Ray with Serve's HAProxy ingress; HAProxy, not
    Serve's Python proxy, holds the port; chat and streaming answer through it; Ctrl-C ends it within seconds
    (no 30 s drain); the same setting on a Ray started without it (this session's) is refused, naming the key."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from llm.errors import ClusterError
    from llm.serve.stage import check_ingress
    from tests.conftest import LOCAL_YAML
    from tests.serve.conftest import free_port

    port = free_port()
    overrides = [f"storage={tmp_path / 'runs'}", f"serve.model={tiny_model_dir}", "serve.name=tiny",
                 f"serve.port={port}", "serve.min_replicas=1", "serve.max_replicas=1", "serve.ingress=haproxy"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_"))}
    proc = subprocess.Popen([sys.executable, "-m", "llm", "serve", str(LOCAL_YAML), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert proc.poll() is None, "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.usage is not None and chat.usage.completion_tokens >= 1
        chunks = list(client.completions.create(model="tiny", prompt="x", max_tokens=6, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 1
        holders = {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
        assert holders == {"haproxy"}, holders
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(lines)
        assert time.monotonic() - t0 < 25
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    cfg = tiny_config(tmp_path, *serve_overrides(tiny_model_dir, port, "serve.ingress=haproxy")).llm
    with pytest.raises(ClusterError, match="serve.ingress is haproxy.*RAY_SERVE_ENABLE_HA_PROXY=1"):
        check_ingress(cfg)
