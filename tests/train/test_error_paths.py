"""Failures a user must read as one line: a worker's error after Ray Train wrapped it, an unreachable
`ray.address`, a bad `pretrain.model.path`. No Ray is started here."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.errors import ConfigError, LLMRayError, TrainingError
from llm.train.fit import worker_error
from tests.conftest import ROOT, tiny_config

DIVERGED = "pretrain: step 3: loss is nan; lower metadata.llm.pretrain.lr.peak or check the data"
BAD_KEY = "metadata.llm.pretrain.micro_batch_size: must be > 0 (got 0) in cluster/local.yaml"


def _worker_raises(error: BaseException) -> None:
    raise error


def _as_ray_delivers(*errors: BaseException) -> Exception:
    """The `WorkerGroupError` `trainer.fit()` raises when rank i raised `errors[i]`, built by Ray Train's own
    code: each worker wraps its exception with the traceback string, the wrapper crosses to the controller
    pickled (the traceback object does not survive that), and the poll status unwraps it per rank."""
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    statuses = {}
    for rank, error in enumerate(errors):
        try:
            _worker_raises(error)
        except BaseException as e:  # what Ray Train's thread runner catches
            wrapped = construct_user_exception_with_traceback(e)
        statuses[rank] = WorkerStatus(running=False, error=pickle.loads(pickle.dumps(wrapped)))
    return WorkerGroupPollStatus(statuses).get_worker_group_error()


@pytest.mark.parametrize(("raised", "kind", "code"), [
    (ConfigError(BAD_KEY), ConfigError, 2),
    (TrainingError(DIVERGED), TrainingError, 7),
])
def test_worker_error_keeps_kind_message_and_exit_code(tmp_path: Path, raised: LLMRayError, kind: type,
                                                       code: int) -> None:
    from ray.train import TrainingFailedError, WorkerGroupError

    delivered = _as_ray_delivers(raised, raised)
    assert isinstance(delivered, WorkerGroupError) and isinstance(delivered, TrainingFailedError)
    log = tmp_path / "logs" / "pretrain.log"
    err = worker_error(delivered, log, "pretrain")
    assert type(err) is kind and err.exit_code == code
    assert str(err) == f"{raised} (full trace: {log})"
    assert "\n" not in str(err)
    trace = log.read_text()
    assert "Traceback (most recent call last)" in trace and "_worker_raises" in trace and str(raised) in trace


def test_worker_error_of_a_library_exception_is_its_last_line(tmp_path: Path) -> None:
    """An exception that is not ours becomes a TrainingError naming the stage and the worker's last line."""
    log = tmp_path / "pretrain.log"
    err = worker_error(_as_ray_delivers(RuntimeError("CUDA error: out of memory\n")), log, "pretrain")
    assert type(err) is TrainingError and err.exit_code == 7 and err.log == str(log)
    assert str(err) == f"pretrain: training failed in a worker: CUDA error: out of memory (full trace: {log})"
    assert "_worker_raises" in log.read_text()


_CONNECT = """
import json, sys
import ray
from llm.errors import ClusterError
from llm.raycluster import connect
from tests.conftest import tiny_config
try:
    connect(tiny_config(__import__("pathlib").Path(sys.argv[1]), "ray.address=" + sys.argv[2]).llm)
    out = {"error": None}
except ClusterError as e:
    out = {"error": str(e), "code": e.exit_code}
out["initialized"] = ray.is_initialized()
print(json.dumps(out))
"""


def test_unreachable_address_is_one_line_and_starts_no_local_ray(tmp_path: Path) -> None:
    """A real `ray.init` against a port where nothing listens. Ray retries the GCS 20 times, ~40 s each (about
    13 min); its own knobs cut that to one try of ~1 s. They are read once per process by Ray's C++ config,
    hence a fresh interpreter, which also keeps any Ray state out of this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_gcs_server_port_wait_time_s="1", RAY_gcs_rpc_server_connect_timeout_s="1",
               RAY_py_gcs_connect_timeout_s="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _CONNECT, str(tmp_path), f"127.0.0.1:{port}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["initialized"] is False  # no private cluster started beside the unreachable one
    assert out["code"] == 6
    message = out["error"]
    assert "\n" not in message
    assert message.startswith(f"cannot connect to the Ray cluster at 127.0.0.1:{port} (metadata.llm.ray.address): ")
    assert "Failed to connect" in message  # why, in Ray's words
    assert elapsed < 30, f"took {elapsed:.0f}s"


def _model_dir(folder: Path, config: bool = True, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text("{}")
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(("make", "problem"), [
    (lambda p: p / "absent", "is not a directory"),
    (lambda p: _model_dir(p / "m", config=False), "has no config.json (not a Hugging Face model directory)"),
    (lambda p: _model_dir(p / "m", weights=False), "has no weights (*.safetensors or *.bin)"),
])
def test_bad_model_path_fails_on_the_driver(tmp_path: Path, make, problem: str) -> None:
    """Before the sweep's winner is read, any folder moves, data is looked for or Ray is reached."""
    from llm.train.pretrain import model_section, run

    path = make(tmp_path)
    cfg = tiny_config(tmp_path, f"pretrain.model.path={path}").llm
    expected = f"metadata.llm.pretrain.model.path: {path.resolve()} {problem}"
    with pytest.raises(ConfigError) as err:
        model_section(cfg)
    assert str(err.value) == expected
    with pytest.raises(ConfigError) as err:
        run(cfg)  # no data stage exists: any later check would say so instead
    assert str(err.value) == expected
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("pretrain*"))


def test_model_path_reaches_the_workers_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers' cwd is not the driver's: a relative path is resolved where it was checked."""
    from llm.train.pretrain import model_section

    folder = _model_dir(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    assert model_section(tiny_config(tmp_path, "pretrain.model.path=hf").llm).path == str(folder.resolve())
    assert model_section(tiny_config(tmp_path).llm).path is None


def test_model_path_with_another_vocabulary_is_refused_before_training(tmp_path: Path) -> None:
    """A `pretrain.model.path` with fewer token embeddings than the data stage's tokenizer would read every
    packed id past its table as garbage (or fail deep inside a worker): refused on the driver, naming the key."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm import storage
    from llm.data.tokenizer import train_tokenizer
    from llm.train.pretrain import loop_spec

    data = tmp_path / "data"
    tok = train_tokenizer(["the for statement iterates over a sequence"] * 50, data / "tokenizer", vocab_size=300,
                          min_frequency=1)
    (data / "packed" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[1, 2, 3, 4]]}), data / "packed" / "train" / "0.parquet")
    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(str(small))
    cfg = tiny_config(tmp_path, f"pretrain.model.path={small}").llm
    with pytest.raises(ConfigError, match=r"pretrain\.model\.path: the model in .* has \d+ token embeddings"):
        loop_spec(cfg, storage.Folder(str(tmp_path / "out")), storage.Folder(str(data)))
