"""Sweep overhead and ASHA's economy, measured side by side in one run (not a pass/fail test).

    python bench/sweep.py [--trials 16] [--steps 36] [--concurrent 2]

The same seeded sweep (same trials, same draws, same data, same model) runs twice on a private local
Ray (4 logical CPUs, each trial 1 worker x 1 CPU): with ASHA, and with every trial run to the end.

1. Scheduling overhead: the ASHA sweep's wall time / (sum of its trials' wall times / concurrent slots).
   1.0 means the slots were never idle; Tune's bookkeeping, trial start-up gaps and a last trial running
   alone all push it up. Goal <= 1.2.
2. ASHA economy: training steps ASHA spent / steps spent running every trial to the end. Goal <= 0.5,
   with the same best schedule (or one whose final validation loss is within 1% of the full sweep's).
   ASHA needs trials to compare and steps to tell them apart: with 6 trials of 24 steps it stopped too few
   (0.78) or stopped the eventual winner at its first rung (1.7% apart); 16 trials of 36 steps (grace 6,
   reduction 3) is the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway Ray on this machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sweep_overrides(trials: int, steps: int, concurrent: int, scheduler: str) -> list[str]:
    return ["sweep.enabled=true", f"sweep.num_trials={trials}", f"sweep.max_steps={steps}", "sweep.eval_every=2",
            "sweep.eval_batches=2", f"sweep.grace_period={max(2, steps // 6)}", "sweep.reduction_factor=3",
            "sweep.seed=11", "sweep.space.kind=[cosine, constant, linear, wsd]", "sweep.space.peak=[1e-4, 3e-2]",
            f"sweep.scheduler={scheduler}", "sweep.sizing.cpus_per_worker=1",
            f"sweep.max_concurrent_trials={concurrent}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()

    import ray

    from llm.tune.stage import run
    from tests.train.conftest import build_data_stage, train_config

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="llmray-bench-sweep-") as tmp:
        for scheduler in ("asha", "none"):
            loaded = train_config(Path(tmp) / scheduler, *sweep_overrides(args.trials, args.steps, args.concurrent,
                                                                          scheduler))
            build_data_stage(loaded)  # the same tokens for both sweeps (built once, copied)
            result = run(loaded.llm)
            best = json.loads((Path(result.path) / "best.json").read_text())
            out[scheduler] = {**result.metrics, "best": best}
    ray.shutdown()
    asha, full = out["asha"], out["none"]
    for name, m in (("ASHA", asha), ("full", full)):
        print(f"{name} sweep: {m['trials']} trials, {m['stopped_early']} stopped early, {m['steps_spent']} steps, "
              f"wall {m['sweep_seconds']:.1f}s, trials' sum {m['trial_seconds']:.1f}s, "
              f"{m['concurrent_trials']} slots")
    overhead = asha["sweep_seconds"] / (asha["trial_seconds"] / asha["concurrent_trials"])
    print(f"scheduling overhead (ASHA sweep): wall {asha['sweep_seconds']:.1f}s / (trials' sum "
          f"{asha['trial_seconds']:.1f}s / {asha['concurrent_trials']} slots) = {overhead:.2f} (goal <= 1.2)")
    full_overhead = full["sweep_seconds"] / (full["trial_seconds"] / full["concurrent_trials"])
    print(f"scheduling overhead (full sweep, for reference): {full_overhead:.2f}")
    a, f = asha["best"], full["best"]
    same = a["trial_id"].rsplit("_", 1)[-1] == f["trial_id"].rsplit("_", 1)[-1]  # same index: same draw
    gap = abs(a["final_val_loss"] - f["final_val_loss"]) / f["final_val_loss"] * 100
    print(f"best schedule: ASHA {a['schedule']['kind']} peak {a['schedule']['peak']:.2e} (val loss "
          f"{a['final_val_loss']:.4f}), full {f['schedule']['kind']} peak {f['schedule']['peak']:.2e} (val loss "
          f"{f['final_val_loss']:.4f}): {'the same trial' if same else 'different trials'}, {gap:.2f}% apart "
          f"(goal <= 1)")
    economy = asha["steps_spent"] / full["steps_spent"]
    print(f"ASHA economy: steps {asha['steps_spent']} / {full['steps_spent']} = {economy:.2f} (goal <= 0.5)")


if __name__ == "__main__":
    main()
