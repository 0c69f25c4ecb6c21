"""Training metrics: MFU, the live progress line, `metrics.jsonl`, optional TensorBoard and MLflow."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llm import storage
from llm.errors import ConfigError


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int, peak_flops_per_device: float | None) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the devices' peak (0 when the peak is unknown)."""
    if not peak_flops_per_device:
        return 0.0
    return flops_per_token * tokens_per_s / (peak_flops_per_device * world_size)


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """The JSON lines of `metrics.jsonl` (a local path or an object-store URI); a last line cut by a kill
    is dropped, not fatal."""
    try:
        lines = storage.read_text(path).splitlines()
    except FileNotFoundError:
        return []
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by an interruption mid-write
            raise ConfigError(f"{path}:{i + 1}: not a JSON line") from None
    return out


def training_summary(records: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """A training stage's manifest metrics from its `metrics.jsonl` records and the fit's last metrics: steps,
    tokens, first and final loss, last validation loss and perplexity, mean MFU."""
    vals = [r for r in records if "val_loss" in r]
    return {"steps": records[-1]["step"] if records else 0, "tokens": records[-1]["tokens"] if records else 0,
            "first_loss": records[0]["loss"] if records else None,
            "final_loss": metrics.get("loss", records[-1]["loss"] if records else None),
            "val_loss": vals[-1]["val_loss"] if vals else None, "val_ppl": vals[-1].get("val_ppl") if vals else None,
            "mean_mfu": sum(r["mfu"] for r in records) / len(records) if records else None}


def progress_line(path: Path | str, max_steps: int, name: str) -> str | None:
    """The live line of a training run from its `metrics.jsonl` (the driver's view of rank 0's records)."""
    records = read_records(path)
    if not records:
        return f"[{name}] starting workers (model, DeepSpeed, first batches)..."
    last = records[-1]
    times = [r["step_time_s"] for r in records[-20:] if r.get("step_time_s")]
    eta = (max_steps - last["step"]) * (sorted(times)[len(times) // 2] if times else 0.0)
    parts = [f"[{name}] step {last['step']}/{max_steps}", f"loss {last['loss']:.4f}", f"lr {last['lr']:.2e}",
             f"tok/s {last['tokens_per_s'] / 1e3:.1f}k", f"MFU {100 * last['mfu']:.1f}%"]
    vals = [r for r in records if "val_loss" in r]
    if vals:
        parts.append(f"val {vals[-1]['val_loss']:.4f}")
    parts.append(f"ETA {fmt_seconds(eta)}")
    return " ".join(parts)


class MetricsLog:
    """Rank 0's sinks: a JSON line per step, the live line every `log_every` steps, TensorBoard, MLflow.

    On resume, records after the restored step are dropped first, so the file reads as one clean run.
    Eight arguments: the file's place and the live line's cadence, then one per optional sink, each off by
    default (tests and benchmarks open a log without a config section); with `mlflow_run_id`, the steps go
    into that run (the stage's tracked run, `llm.tracking`), otherwise `mlflow_uri` opens a run of its own.
    """

    def __init__(self, out_dir: str | Path | None, max_steps: int, log_every: int, resumed_step: int = 0,
                 tensorboard: bool = False, mlflow_uri: str | None = None, name: str = "pretrain",
                 mlflow_run_id: str | None = None) -> None:
        self.max_steps, self.log_every, self.name = max_steps, log_every, name
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir else None
        self._ema: float | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            keep = [r for r in read_records(self.path) if r.get("step", 0) <= resumed_step]
            # temp file + rename: a reader (the upload to a bucket, `llmray report`) or a crash mid-write sees
            # the old file or the new one, never a truncated one
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self._tb = None
        if tensorboard and out_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(f"metadata.llm.{name}.tensorboard: needs the `tensorboard` package "
                                  "(pip install 'llmray[tracking]')") from None
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resumed_step + 1)
        self._mlflow = None
        self._mlflow_run: tuple[Any, str] | None = None
        if mlflow_uri:
            try:
                import mlflow
            except ImportError:
                raise ConfigError(f"metadata.llm.{name}.mlflow_uri: needs the `mlflow` package "
                                  "(pip install 'llmray[tracking]')") from None
            if mlflow_run_id:  # the stage's run, opened and ended by the driver (`llm.tracking`): logged by id
                self._mlflow_run = (mlflow.MlflowClient(mlflow_uri), mlflow_run_id)
            else:  # the stage section's own `mlflow_uri`: a run of this process alone
                mlflow.set_tracking_uri(mlflow_uri)
                mlflow.set_experiment(f"llmray-{name}")
                mlflow.start_run()
                self._mlflow = mlflow
        self._t0 = time.perf_counter()
        self._logged = 0

    def log(self, record: dict[str, Any]) -> None:
        """Record one step; prints the live line on `log_every` steps, evaluations and the last step."""
        step = int(record["step"])
        dt = record.get("step_time_s")
        self._logged += 1
        if dt:  # the first step of a process carries its start-up (data pipeline, JIT): the second restarts the mean
            prev = self._ema
            self._ema = dt if prev is None or self._logged == 2 else 0.9 * prev + 0.1 * dt
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{self.name}/{k}", v, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(numeric, step=step)
        if self._mlflow_run is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow_run
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in numeric.items()])
        if step % self.log_every == 0 or step == self.max_steps or "val_loss" in record:
            # Written, not printed: Ray Train V2 patches `print` in workers to tee into its logger as well,
            # and both copies reached the driver. One write to stdout is forwarded once.
            sys.stdout.write(self.line(record) + "\n")
            sys.stdout.flush()

    def line(self, r: dict[str, Any]) -> str:
        """`[pretrain] step 50/200 loss 5.1234 lr 2.91e-03 gnorm 1.02 tok/s 12.3k MFU 3.1% ETA 1m20s`."""
        eta = (self.max_steps - r["step"]) * (self._ema or 0.0)
        parts = [f"[{self.name}] step {r['step']}/{self.max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None:
            parts.append(f"gnorm {r['grad_norm']:.3g}")
        parts += [f"tok/s {r['tokens_per_s'] / 1e3:.1f}k", f"MFU {100 * r['mfu']:.1f}%"]
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f} ppl {r['val_ppl']:.1f}")
        parts.append(f"ETA {fmt_seconds(eta)}")
        return " ".join(parts)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
