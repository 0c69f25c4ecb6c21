"""One run of four stages through the real stage contract (`llm.stage.execute`: lease, attempt marker, commit,
set-aside, resume), with bodies that write the way data, pretrain, finetune and compress write: shards and a
stats file; checkpoints every few steps straight to storage and a model at the end (resumable); variants and
an eval table. Run as a subprocess by tests/storage/test_chaos.py, which kills it and injects faults:

    python -m tests.storage.chaos_driver <storage> <executed-log>
    CHAOS_KILL_AT=N      os._exit(137) at the N-th storage call (no finally, no cleanup: a SIGKILL)
    CHAOS_FAULT_EVERY=K  every K-th storage call (shifted by CHAOS_FAULT_OFFSET) raises a transient OSError

Exit 0: every stage committed; 3: a stage stopped on an error (printed as one line). With `--serve` it
imports once and forks a child per run it reads from stdin (one JSON object a line: root, executed, env,
out), answering each with the child's exit code: a round then costs a fork, not an interpreter start.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import sys
from typing import Any

from llm import lease, storage
from llm.errors import LLMRayError
from llm.stage import Stage, StageResult, execute, stage_input
from tests.conftest import LOCAL_YAML

WRAPPED = ("read_bytes", "write_bytes", "exists", "size", "list_files", "remove_file", "remove_tree", "move_tree",
           "upload", "download", "create_new", "replace_if", "remove_if")
_calls = 0
_faults = 0


def _inject() -> None:
    kill_at = int(os.environ.get("CHAOS_KILL_AT", "0"))
    fault_every = int(os.environ.get("CHAOS_FAULT_EVERY", "0"))
    offset = int(os.environ.get("CHAOS_FAULT_OFFSET", "0"))

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            global _calls, _faults
            _calls += 1
            if kill_at and _calls == kill_at:
                sys.stdout.flush()
                os._exit(137)
            if fault_every and (_calls + offset) % fault_every == 0:
                _faults += 1
                raise ConnectionResetError(errno.ECONNRESET, "injected fault: connection reset by peer")
            return fn(*args, **kwargs)
        return call

    for name in WRAPPED:
        setattr(storage, name, wrap(getattr(storage, name)))
    storage.BACKOFF_S = 0.01  # the retry pauses and the lease's settle pause, shortened for the test
    lease.SETTLE_S = 0.05


def _log(executed: str, stage: str, step: int) -> None:
    with open(executed, "a") as f:  # outside the storage under test: the record of work actually done
        f.write(f"{stage} {step}\n")


def _blob(*parts: Any) -> bytes:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest().encode() * 64


def _data(folder: storage.Folder) -> dict[str, Any]:
    for i in range(3):
        folder.write_bytes(f"packed/train/{i:03d}.parquet", _blob("shard", i))
    folder.write_text("stats.json", json.dumps({"documents_out": 3}))
    return {"documents_out": 3}


def _training(name: str, source: str, steps: int, every: int, executed: str) -> Any:
    def body(folder: storage.Folder) -> dict[str, Any]:
        state = hashlib.sha256(stage_input(CFG, source).read_bytes(
            "stats.json" if source == "data" else "model/weights.bin")).hexdigest()
        start = 0
        for rel in sorted(storage.list_files(folder.path("ckpt")), reverse=True):
            try:  # the newest checkpoint that reads whole (a killed write leaves none half-written)
                saved = json.loads(storage.read_bytes(folder.path("ckpt", rel)))
                start, state = saved["step"], saved["state"]
                break
            except (ValueError, KeyError, OSError):
                continue
        for step in range(start + 1, steps + 1):
            state = hashlib.sha256(f"{state}/{step}".encode()).hexdigest()
            _log(executed, name, step)
            if step % every == 0:
                storage.write_bytes(folder.path("ckpt", f"{step:04d}.json"),
                                    json.dumps({"step": step, "state": state}).encode())
        folder.write_bytes("model/weights.bin", _blob(name, state))
        return {"final_state": state[:16]}
    return body


def _compress(folder: storage.Folder) -> dict[str, Any]:
    weights = stage_input(CFG, "finetune").read_bytes("model/weights.bin")
    for variant in ("int8", "pruned"):
        folder.write_bytes(f"{variant}/model.bin", _blob(variant, weights[:64].decode()))
    folder.write_text("eval.json", json.dumps([{"model": "int8"}, {"model": "pruned"}]))
    folder.write_text("chosen.json", json.dumps({"variant": "int8"}))
    return {"chosen": "int8"}


def _stage(name: str, sections: tuple[str, ...], inputs: tuple[str, ...], resumable: bool) -> Stage:
    def run(cfg: Any, force: bool = False) -> StageResult:
        raise NotImplementedError
    return Stage(name, name, run, sections=sections, inputs=inputs, resumable=resumable)


STAGES = [_stage("data", ("data",), (), False), _stage("pretrain", ("pretrain",), ("data",), True),
          _stage("finetune", ("finetune",), ("pretrain",), True),
          _stage("compress", ("compress",), ("finetune",), False)]
CFG: Any = None


def main(root: str, executed: str) -> int:
    global CFG
    from llm.loading import load_config

    CFG = load_config(LOCAL_YAML, [f"storage={root}"]).llm
    _inject()
    return _stages(executed)


def serve() -> int:
    """Fork a child per request line; the child runs `main` with the request's environment, its output in
    the request's `out` file; answer with its exit code."""
    import llm.loading  # noqa: F401  (imported once here; every child has it)

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: a fresh run, killed or not
            fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(req["env"])
            try:
                code = main(req["root"], req["executed"])
            except BaseException:  # anything unplanned shows in the output and fails the round
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
    return 0


def _stages(executed: str) -> int:
    bodies = {"data": _data, "pretrain": _training("pretrain", "data", 8, 2, executed),
              "finetune": _training("finetune", "pretrain", 4, 1, executed), "compress": _compress}
    code = 0
    try:
        for stage in STAGES:
            execute(CFG, stage, bodies[stage.name])
    except (LLMRayError, OSError) as e:
        print(f"{type(e).__name__}: {storage.one_line(e)}", flush=True)
        code = 3
    print(f"storage calls {_calls}\nfaults injected {_faults}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(serve() if sys.argv[1:] == ["--serve"] else main(sys.argv[1], sys.argv[2]))
