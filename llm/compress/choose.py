"""The rule that names the variant to serve: among variants within the quality and speed limits, the best by
`prefer`.

A variant passes when every perplexity measured for both it and the original (val, SFT) rose by at most
`max_ppl_increase` (relative), its ROUGE-L fell by at most `max_rouge_drop` (absolute), every lm-eval column
named in `min_task_scores` reaches its least value, and it generates at
least `min_speed_ratio` of the original's tokens/s at the serving batch (`tok_s_serve`): a smaller file that
serves slower is no saving (int8 on a CPU without fast kernels decoded 916 vs 1,103 tokens/s at batch 1 in
the quickstart). A figure the original lacks is not a limit; a figure the variant lacks while the original
has it fails the variant (an unmeasured model is not a safe choice). With no variant passing, the original is
served and the reason says why each variant failed; otherwise the reason gives the chosen variant's figures
beside the original's, and names the variants left out and why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm import storage
from llm.config.compress import ChooseConfig
from llm.errors import ConfigError
from llm.models.load import CHOSEN, ORIGINAL

EPS = 1e-9  # a figure exactly at a limit passes, whatever the float rounding of the subtraction
PREFER = {"smallest_disk": ("disk_mb", min), "fewest_params": ("params", min), "fastest": ("tok_s_serve", max)}
SPEED = "tok_s_serve"


def failures(row: Mapping[str, Any], original: Mapping[str, Any], rule: ChooseConfig) -> list[str]:
    """Why `row` fails the rule against `original` (empty: it passes)."""
    why = []
    for key in ("val_ppl", "sft_ppl"):
        base, value = original.get(key), row.get(key)
        if base is None:
            continue
        if value is None:
            why.append(f"{key} not measured")
        elif value > base * (1.0 + rule.max_ppl_increase) + EPS:
            why.append(f"{key} {value:.3f} > {base:.3f} x {1 + rule.max_ppl_increase:g}")
    base, value = original.get("rouge_l"), row.get("rouge_l")
    if base is not None:
        if value is None:
            why.append("rouge_l not measured")
        elif base - value > rule.max_rouge_drop + EPS:
            why.append(f"rouge_l {value:.3f} dropped {base - value:.3f} > {rule.max_rouge_drop:g}")
    base, value = original.get(SPEED), row.get(SPEED)
    if base is not None and rule.min_speed_ratio > 0:
        if value is None:
            why.append(f"{SPEED} not measured")
        elif value < base * rule.min_speed_ratio - EPS:
            why.append(f"{SPEED} {value:.1f} < {base:.1f} x {rule.min_speed_ratio:g} (slower to serve)")
    for key, least in rule.min_task_scores.items():
        value = row.get(key)
        if value is None:
            why.append(f"{key} not measured")
        elif value < least - EPS:
            why.append(f"{key} {value:.4g} < {least:g}")
    return why


def _figures(row: Mapping[str, Any], original: Mapping[str, Any], keys: Sequence[str]) -> str:
    """`key value (original value)` for each key measured for the row, 4 significant digits."""
    parts = [f"{k} {row[k]:.4g} (original {original[k]:.4g})" if original.get(k) is not None else f"{k} {row[k]:.4g}"
             for k in keys if row.get(k) is not None]
    return ", ".join(parts)


def choose(rows: Sequence[Mapping[str, Any]], rule: ChooseConfig, serve_batch: int | None = None) -> dict[str, Any]:
    """`{"variant", "reason", "rule", "checks", "serve_batch"}` for evaluation rows whose first row named
    `original` is the model compressed; `serve_batch` is the batch `tok_s_serve` was measured at (for the
    reason and `chosen.json`).

    Raises:
        ConfigError: no `original` row, or the `prefer` figure missing from a passing variant.
    """
    by_name = {r["model"]: r for r in rows}
    if ORIGINAL not in by_name:
        raise ConfigError(f"compress: the evaluation rows have no {ORIGINAL!r} row to compare with")
    original = by_name[ORIGINAL]
    checks = {name: failures(r, original, rule) for name, r in by_name.items() if name != ORIGINAL}
    passing = [by_name[name] for name, why in checks.items() if not why]
    key, best = PREFER[rule.prefer]
    at = f" at batch {serve_batch}" if serve_batch else ""
    limits = f"perplexity within +{rule.max_ppl_increase:.0%}, ROUGE-L drop <= {rule.max_rouge_drop:g}"
    if rule.min_speed_ratio > 0:
        limits += f", serving tokens/s{at} >= {rule.min_speed_ratio:g} x the original's"
    limits += "".join(f", {k} >= {v:g}" for k, v in rule.min_task_scores.items())
    out = {"rule": rule.model_dump(mode="json"), "checks": checks, "serve_batch": serve_batch}
    if not passing:
        failed = "; ".join(f"{name}: {', '.join(why)}" for name, why in checks.items()) or "no variants"
        return {"variant": ORIGINAL, "reason": f"no variant passed ({limits}): {failed}; serving the original",
                **out}
    missing = [r["model"] for r in passing if r.get(key) is None]
    if missing:
        raise ConfigError(f"metadata.llm.compress.choose.prefer: {rule.prefer} needs {key}, not measured for "
                          f"{', '.join(missing)}")
    pick = best(passing, key=lambda r: r[key])
    shown = [key, *(k for k in ("disk_mb", SPEED) if k != key)]
    left_out = "; ".join(f"{name}: {', '.join(why)}" for name, why in checks.items() if why)
    reason = (f"{rule.prefer.replace('_', ' ')} of {len(passing)} passing variant(s) ({limits}): "
              f"{_figures(pick, original, shown)}" + (f"; left out: {left_out}" if left_out else ""))
    return {"variant": pick["model"], "reason": reason, **out}


def write_chosen(folder: Path, choice: dict[str, Any], original_dir: Path | str, stage_uri: str | None = None) -> Path:
    """`compress/chosen.json` in the local folder `folder`, which `llm.models.load.chosen_model_dir` reads;
    `path` is relative to the compress folder (`stage_uri`, default `folder`): the variant's folder name, or
    for the original in another stage of the run `../<stage>/model`, so a run folder copied or moved
    elsewhere still names its own models; an original outside the run keeps its absolute path or URI."""
    path = folder / CHOSEN
    where = choice["variant"]
    if choice["variant"] == ORIGINAL:
        where = storage.Folder(original_dir).uri
        run = (stage_uri or storage.Folder(folder).uri).rstrip("/").rsplit("/", 1)[0]
        if where.startswith(run + "/"):
            where = "../" + where[len(run) + 1:]
    path.write_text(json.dumps({**choice, "path": where}, indent=2) + "\n")
    return path
