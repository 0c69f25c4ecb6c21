"""`ray job submit` end to end: a local head started with `ray start --head` (token auth on), the main job
and a single-stage job submitted with `--working-dir .`, outputs and `ray job logs` checked; the console
of the main job stays within its line budget with Ray's own chatter in the stage logs. Then the pipeline in
this process on the session's Ray: the job's committed stages skip; a changed input reruns what depends on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TINY = ("data.sft.sources=[]", "data.seq_len=32", "data.tokenizer.vocab_size=384", "pretrain.model.context=32",
        "pretrain.max_steps=4", "pretrain.micro_batch_size=2", "pretrain.checkpoint_every=2",
        "pretrain.eval_every=2", "pretrain.eval_batches=1", "pretrain.log_every=1", "pretrain.lr.warmup_steps=1",
        "pretrain.max_failures=0", "serve.enabled=false", "compress.enabled=false",
        "finetune.enabled=false")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "the ray CLI of this environment"
    # The entrypoint's `python` is the one on PATH when `ray start` runs: this environment's.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # `ray start` in token mode never creates a token (only `ray.init()` does): on a fresh machine without
    # ~/.ray/auth_token the head would not start. This cluster gets its own token; the CLI, the head and the
    # job's driver (which inherits the head's environment) all read it from RAY_AUTH_TOKEN_PATH.
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(generate_new_authentication_token())
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    env.pop("RAY_AUTH_TOKEN", None)
    log = open(tmp_path_factory.mktemp("head") / "ray-start.log", "w+")
    gcs, dash, agent = _port(), _port(), _port()
    # `--block` keeps the head's processes children of this one: stopping it stops this cluster only
    # (`ray stop` would kill every Ray on the machine, the test session's own included).
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", "--num-cpus=4", "--include-dashboard=true",
                             "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
    try:
        yield ray, env, proc, log
    finally:
        os.killpg(proc.pid, 15)  # the head's processes share its session
        try:  # a graceful stop takes ~30 s here; nothing of this throwaway cluster needs one
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        log.close()


def _submit(head, *entrypoint: str) -> tuple[str, str]:
    ray, env, proc, log = head
    for _ in range(60):  # the head and its job agent take a few seconds to come up after `ray start`
        if proc.poll() is not None:  # the head is gone: say why instead of retrying into a timeout
            log.seek(0)
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{log.read()[-3000:]}")
        out = subprocess.run([ray, "job", "submit", "--working-dir", ".", "--", "python", *entrypoint], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=900)
        text = out.stdout + out.stderr
        if "No available agent" not in text and "Connection refused" not in text and "Failed to connect" not in text:
            break
        time.sleep(3)
    job = re.search(r"raysubmit_\w+", out.stdout + out.stderr)
    assert job, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0 and f"Job '{job.group(0)}' succeeded" in out.stdout + out.stderr, out.stdout[-4000:]
    logs = subprocess.run([ray, "job", "logs", job.group(0)], env=env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0
    return job.group(0), logs.stdout


@pytest.fixture(scope="module")
def pipeline_job(head, tmp_path_factory):
    """The main job (`jobs/pipeline.py`: data then pretrain) submitted once: (run folder, job args, `ray job logs`)."""
    from pydoc_data.topics import topics

    tmp = tmp_path_factory.mktemp("job")
    corpus = tmp / "topics.jsonl"
    corpus.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:60]))
    args = ["cluster/local.yaml", f"storage={tmp / 'runs'}", f"data.sources=[{corpus}]", *TINY]
    _, logs = _submit(head, "jobs/pipeline.py", *args)
    return tmp / "runs" / "local-tiny", args, logs


def test_pipeline_then_single_stage_job(head, pipeline_job) -> None:
    run, args, logs = pipeline_job
    assert (run / "pretrain" / "_MANIFEST.json").exists()
    assert (run / "pretrain" / "model" / "model.safetensors").exists()
    assert (run / "report.html").exists()
    # The calm console: headers, live lines and summaries only; Ray's chatter is in the stage logs.
    lines = [ln for ln in logs.splitlines() if ln.strip()]
    assert len(lines) < 80, "\n".join(lines)
    assert "== data:" in logs and "== pretrain:" in logs and "pretrain: 4 steps" in logs
    assert "Reporting training result" not in logs and "Traceback" not in logs
    # From the first header on (before it: `ray job logs`' own lines), neither a Ray log record
    # (`... INFO worker.py:123 -- ...`) nor a forwarded worker line (`(name pid=1) ...`).
    driver = lines[next(i for i, ln in enumerate(lines) if ln.startswith("== data:")):]
    from_ray = [ln for ln in driver if " -- " in ln or re.match(r"\((\S+ )?pid=", ln)]
    assert not from_ray, "\n".join(from_ray)
    assert (run / "logs" / "pretrain.log").stat().st_size > 0

    _, again = _submit(head, "jobs/pretrain.py", *args, "pretrain.log_every=2")
    assert "pretrain: skipped" in again


@pytest.mark.ray
def test_the_jobs_stages_skip_in_process_then_rerun_on_a_changed_input(ray_session, pipeline_job) -> None:
    """The real data stage fed the real pretrain stage in the job; the same config run here (another Ray, another
    process) skips both; a changed data config reruns data, and pretrain after it because its input changed,
    keeping the old folder aside; knobs that change no output skip a finished stage."""
    from llm.loading import load_config
    from llm.manifest import manifest_hash, read_manifest
    from llm.stages import run_pipeline, stages_to_run
    from tests.conftest import LOCAL_YAML

    run, args, _ = pipeline_job
    overrides = args[1:]
    cfg = load_config(LOCAL_YAML, overrides).llm
    assert stages_to_run(cfg) == ["data", "pretrain"]
    # Pretrain read the data stage's committed output: its manifest names the data manifest as input.
    manifest = read_manifest(run / "pretrain")
    assert manifest is not None and manifest.inputs == {"data": manifest_hash(run / "data")}
    recs = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["tokens"] == 4 * 2 * 2 * 32

    again = run_pipeline(cfg)
    assert [r.stage for r in again] == ["data", "pretrain"] and [r.skipped for r in again] == [True, True]
    changed_keys = ("data.val_fraction=0.2", "pretrain.lr.peak=1e-3")
    changed = run_pipeline(load_config(LOCAL_YAML, [*overrides, *changed_keys]).llm)
    assert [r.skipped for r in changed] == [False, False]
    kept = changed[1].kept_aside
    assert kept and read_manifest(kept) is not None and (Path(kept) / "model" / "model.safetensors").exists()
    knobs = load_config(LOCAL_YAML, [*overrides, *changed_keys, "pretrain.log_every=5", "pretrain.eval_every=1"])
    assert [r.skipped for r in run_pipeline(knobs.llm)] == [True, True]
