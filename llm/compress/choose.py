"""The rule that names the variant to serve: among variants within the quality limits, the best by `prefer`.

A variant passes when every perplexity measured for both it and the original (val, SFT) rose by at most
`max_ppl_increase` (relative) and its ROUGE-L fell by at most `max_rouge_drop` (absolute). A figure the
original lacks is not a limit; a figure the variant lacks while the original has it fails the variant
(an unmeasured model is not a safe choice). With no variant passing, the original is served and the
reason says why each variant failed.
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
PREFER = {"smallest_disk": ("disk_mb", min), "fewest_params": ("params", min), "fastest": ("tok_s_b1", max)}


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
    return why


def choose(rows: Sequence[Mapping[str, Any]], rule: ChooseConfig) -> dict[str, Any]:
    """`{"variant", "reason", "rule", "checks"}` for evaluation rows whose first row named `original` is the
    model compressed.

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
    limits = f"perplexity within +{rule.max_ppl_increase:.0%}, ROUGE-L drop <= {rule.max_rouge_drop:g}"
    if not passing:
        failed = "; ".join(f"{name}: {', '.join(why)}" for name, why in checks.items()) or "no variants"
        return {"variant": ORIGINAL, "reason": f"no variant passed ({limits}): {failed}; serving the original",
                "rule": rule.model_dump(mode="json"), "checks": checks}
    missing = [r["model"] for r in passing if r.get(key) is None]
    if missing:
        raise ConfigError(f"metadata.llm.compress.choose.prefer: {rule.prefer} needs {key}, not measured for "
                          f"{', '.join(missing)}")
    pick = best(passing, key=lambda r: r[key])
    return {"variant": pick["model"],
            "reason": f"{rule.prefer.replace('_', ' ')} ({key} {pick[key]:.4g}) of {len(passing)} passing "
                      f"variant(s) ({limits})",
            "rule": rule.model_dump(mode="json"), "checks": checks}


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
