"""A finished sweep's record: one row per trial (`trials.csv`), the curves (`curves.png`), a summary table."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm import storage
from llm.train.metrics import read_records
from llm.tune.space import schedule_of

COLUMNS = ["trial_id", "kind", "peak", "warmup_fraction", "warmup_steps", "floor", "weight_decay",
           "micro_batch_size", "steps", "final_val_loss", "best_val_loss", "stopped_early", "wall_s", "status"]


@dataclass
class TrialRow:
    """One trial: the schedule it ran, how far it got, its validation losses and wall time."""

    trial_id: str
    kind: str
    peak: float
    warmup_fraction: float
    warmup_steps: int
    floor: float
    weight_decay: float | None
    micro_batch_size: int | None
    steps: int
    final_val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    wall_s: float
    status: str
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, val_loss) at every evaluation."""

    def csv_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in COLUMNS}


def _curve(result: Any, folder: Path | str) -> list[tuple[int, float]]:
    """Tune's record of the trial's reports; the trial's own metrics.jsonl when Tune kept none."""
    df = result.metrics_dataframe
    if df is not None and "val_loss" in df and "step" in df:
        rows = df[["step", "val_loss"]].dropna()
        points = {int(s): float(v) for s, v in zip(rows["step"], rows["val_loss"], strict=True)}
    else:
        points = {int(r["step"]): float(r["val_loss"]) for r in read_records(storage.join(folder, "metrics.jsonl"))
                  if "val_loss" in r}
    return sorted(points.items())


def trial_rows(grid: Any, trials_dir: Path | str, max_steps: int) -> list[TrialRow]:
    """Rows of a Tune `ResultGrid`, in trial-id order (`trials_dir`: a local folder or a store URI)."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        values = result.config or {}
        curve = _curve(result, storage.join(trials_dir, trial_id))
        steps = int(metrics.get("step", curve[-1][0] if curve else 0))
        finite = [v for _, v in curve if math.isfinite(v)]
        status = "error" if result.error else ("finished" if steps >= max_steps else "stopped")
        rows.append(TrialRow(
            trial_id=trial_id, kind=values["kind"], peak=float(values["peak"]),
            warmup_fraction=float(values["warmup_fraction"]),
            warmup_steps=schedule_of(values, max_steps).warmup_steps, floor=float(values["floor"]),
            weight_decay=values.get("weight_decay"), micro_batch_size=values.get("micro_batch_size"),
            steps=steps, final_val_loss=curve[-1][1] if curve else None,
            best_val_loss=min(finite) if finite else None, stopped_early=status == "stopped",
            wall_s=round(float(metrics.get("time_total_s", 0.0)), 3), status=status, curve=curve,
        ))
    return sorted(rows, key=lambda r: r.trial_id)


def choose_best(rows: list[TrialRow]) -> TrialRow | None:
    """The lowest final validation loss among trials that ran every step (a stopped trial's loss is from
    an earlier step, so it is compared only when no trial finished)."""
    scored = [r for r in rows if r.status != "error" and r.final_val_loss is not None
              and math.isfinite(r.final_val_loss)]
    finished = [r for r in scored if r.status == "finished"] or scored
    return min(finished, key=lambda r: (r.final_val_loss, r.trial_id)) if finished else None


def write_csv(rows: list[TrialRow], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.csv_row())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(rows: list[TrialRow], best: TrialRow | None, path: Path) -> None:
    """Validation loss against step, one line per trial: stopped trials dashed (and shorter), the best bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if not row.curve:
            continue
        steps, losses = zip(*row.curve, strict=True)
        is_best = best is not None and row.trial_id == best.trial_id
        ax.plot(steps, losses, "--" if row.stopped_early else "-", marker="o", markersize=3,
                linewidth=2.5 if is_best else 1.2, alpha=1.0 if is_best or not row.stopped_early else 0.7,
                label=f"{row.kind} {row.peak:.1e}{' (best)' if is_best else ''}"
                      f"{' stopped' if row.stopped_early else ''}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("sweep: validation loss per trial (dashed: stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(rows: list[TrialRow], best: TrialRow | None, limit: int = 12) -> str:
    """The trials by final validation loss: one line each, the best marked."""
    def key(r: TrialRow) -> tuple[int, float]:
        return (r.status != "finished", r.final_val_loss if r.final_val_loss is not None else math.inf)

    lines = [f"  {'trial':<18}{'kind':<13}{'peak':>9}{'warmup':>7}{'floor':>6}{'steps':>6}"
             f"{'val loss':>10}{'best':>9}{'wall s':>8}  status"]
    for r in sorted(rows, key=key)[:limit]:
        mark = "*" if best is not None and r.trial_id == best.trial_id else " "
        final = f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "-"
        top = f"{r.best_val_loss:.4f}" if r.best_val_loss is not None else "-"
        lines.append(f"{mark} {r.trial_id:<18}{r.kind:<13}{r.peak:>9.2e}{r.warmup_steps:>7}{r.floor:>6.2f}"
                     f"{r.steps:>6}{final:>10}{top:>9}{r.wall_s:>8.1f}  {r.status}")
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more in trials.csv")
    return "\n".join(lines)
